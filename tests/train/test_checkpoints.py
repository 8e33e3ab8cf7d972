"""Checkpoint folders: written whole or not at all, loaded strictly and only when everything fits,
with one-line errors for a truncated file, a foreign file or another recipe's checkpoint."""

import gin
import pytest
import torch

from vlblocks.app.run import build_run
from vlblocks.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_metadata,
    keep_last,
    load_checkpoint,
    load_training_state,
    recipe_differences,
    save_checkpoint,
    step_folders,
)
from vlblocks.train.distributed import load_optimizer_state
from vlblocks.train.optim import build_adamw

quiet = lambda *_: None  # noqa: E731


@pytest.fixture()
def saved(demo_recipe, small_demo_bindings, tmp_path):
    task, _, _ = build_run(demo_recipe, small_demo_bindings, echo=quiet)
    recipe = gin.config_str()
    optimizer = build_adamw(task, 1e-3)
    for parameter in task.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    optimizer.step()  # a stepped optimiser, so its state (step, exp_avg, exp_avg_sq) is not empty
    folder = save_checkpoint(task, tmp_path / "checkpoints", 7, recipe, {"step": 7, "optimizer": optimizer.state_dict()})
    return task, recipe, folder, optimizer


def test_a_checkpoint_folder_round_trips_weights_metadata_and_state(demo_recipe, small_demo_bindings, saved):
    task, recipe, folder, _ = saved
    assert folder.name == "step-0000007" and sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, STATE_FILE]
    assert not list(folder.parent.glob(".*")), "no temporary folder is left behind"
    assert {"step": "7", "recipe": recipe}.items() <= checkpoint_metadata(folder).items()
    other, _, _ = build_run(demo_recipe, [*small_demo_bindings, "demo/Trainer.seed = 1"], echo=quiet)
    assert not torch.equal(other.model.vlbert.encoder.layer[0].output.dense.weight, task.model.vlbert.encoder.layer[0].output.dense.weight)
    load_checkpoint(other, folder / MODEL_FILE)
    for (name, mine), (_, theirs) in zip(task.state_dict().items(), other.state_dict().items()):
        assert torch.equal(mine, theirs), name
    assert other.model.mlm_head.decoder.weight is other.model.vlbert.embedding.word_embeddings.weight
    state = load_training_state(folder)
    assert state["step"] == 7 and set(state["optimizer"]) == {"state", "param_groups"}



def test_a_stepped_optimisers_state_round_trips_exactly(demo_recipe, small_demo_bindings, saved):
    _, _, folder, optimizer = saved
    other, _, _ = build_run(demo_recipe, small_demo_bindings, echo=quiet)
    load_checkpoint(other, folder / MODEL_FILE)
    restored = build_adamw(other, 1e-3)
    load_optimizer_state(other, restored, load_training_state(folder)["optimizer"], "ddp")
    originals = [optimizer.state[p] for p in optimizer.param_groups[0]["params"]]
    copies = [restored.state[p] for p in restored.param_groups[0]["params"]]
    assert len(copies) == len(originals) > 0 and all(copy.keys() == {"step", "exp_avg", "exp_avg_sq"} for copy in copies)
    for original, copy in zip(originals, copies):
        assert all(torch.equal(original[key], copy[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    # one step with gradient 0.5: step 1, exp_avg = (1 - 0.9) x 0.5 = 0.05, exp_avg_sq = (1 - 0.999) x 0.25 = 0.00025
    first = copies[0]
    assert float(first["step"]) == 1.0
    torch.testing.assert_close(first["exp_avg"], torch.full_like(first["exp_avg"], 0.05))
    torch.testing.assert_close(first["exp_avg_sq"], torch.full_like(first["exp_avg_sq"], 0.00025))

def test_another_recipes_checkpoint_names_the_bindings_that_differ_and_loads_nothing(demo_recipe, small_demo_bindings, saved):
    _, _, folder, _ = saved
    bigger, _, _ = build_run(demo_recipe, [*small_demo_bindings, "NUM_LAYERS = 3"], echo=quiet)
    before = {name: tensor.clone() for name, tensor in bigger.state_dict().items()}
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(bigger, folder, gin.config_str())
    message = str(raised.value)
    assert "written by another recipe" in message and "NUM_LAYERS: 2 -> 3" in message and "\n" not in message
    with pytest.raises(CheckpointError, match=r"does not fit the model: missing: model\.vlbert\.encoder\.layer\.2\..*\(16 in all\)"):
        load_checkpoint(bigger, folder)
    assert all(torch.equal(before[name], tensor) for name, tensor in bigger.state_dict().items()), "a failed load changes nothing"


def test_truncated_and_foreign_files_give_one_line_errors(saved, tmp_path):
    task, _, folder, _ = saved
    data = (folder / MODEL_FILE).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (truncated, folder / STATE_FILE, tmp_path / "missing"):
        with pytest.raises(CheckpointError) as raised:
            load_checkpoint(task, bad)
        assert str(bad) in str(raised.value) and "\n" not in str(raised.value)
    (folder / STATE_FILE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="training_state.pt: cannot be read"):
        load_training_state(folder)


def test_only_complete_folders_count_and_keep_last_prunes_the_oldest(saved, tmp_path):
    task, recipe, folder, _ = saved
    for step in (8, 9, 10):
        save_checkpoint(task, folder.parent, step, recipe)
    (folder.parent / ".step-0000011.partial").mkdir()
    (folder.parent / "step-0000012").mkdir()  # no weights: an interrupted copy, not a checkpoint
    assert [path.name for path in step_folders(folder.parent)] == ["step-0000007", "step-0000008", "step-0000009", "step-0000010"]
    keep_last(folder.parent, 2)
    assert [path.name for path in step_folders(folder.parent)] == ["step-0000009", "step-0000010"]


def test_recipe_differences_read_gin_bindings():
    old = "# Parameters for A:\nA.x = 1\nA.y = [1,\n    2]\n\nB.z = 'p'\n"
    new = "# Parameters for A:\nA.x = 2\nA.y = [1,\n    2]\n\nC.w = 3\n"
    assert recipe_differences(old, new) == ["A.x: 1 -> 2", "B.z: 'p' -> (unset)", "C.w: (unset) -> 3"]
    assert recipe_differences(old, old) == []
