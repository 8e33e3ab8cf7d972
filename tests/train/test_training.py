import json

import pytest
import torch

from vlblocks.app.recipes import RecipeError
from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.train.checkpoint import CheckpointError, load_pretrained, save_checkpoint
from vlblocks.train.optim import build_adamw, scaled_learning_rate, warmup_linear_schedule


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_short_run_lowers_the_loss_and_is_repeatable(demo_recipe, small_demo_bindings, tmp_path):
    train_from_recipe(demo_recipe, small_demo_bindings, tmp_path / "a", echo=lambda *_: None)
    records = [r for r in read_log(tmp_path / "a" / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["mlm/loss"] < records[0]["mlm/loss"]
    assert {"mvrc/accuracy", "mlm_text/loss", "lr", "samples_per_second"} <= set(records[-1])
    assert (tmp_path / "a" / "checkpoints" / "step-0000030" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "recipe.gin").read_text().strip()
    validation = [r for r in read_log(tmp_path / "a" / "metrics.jsonl") if r.get("split") == "val"]
    assert validation and validation[-1]["mlm/count"] > 0

    train_from_recipe(demo_recipe, small_demo_bindings, tmp_path / "b", echo=lambda *_: None)
    again = [r for r in read_log(tmp_path / "b" / "metrics.jsonl") if "split" not in r]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("samples_per_second", "time")}
    assert [strip(r) for r in again] == [strip(r) for r in records], "same seed, same numbers on CPU"


def test_pretraining_continues_from_the_checkpoint_the_recipe_names(demo_recipe, small_demo_bindings, tmp_path):
    """`experiment.pretrained` goes through the task protocol for pre-training too: every tensor
    of the checkpoint, tied word embeddings included, replaces the seeded initialisation."""
    trained, _, _ = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)
    path = save_checkpoint(trained, tmp_path, 3, "recipe")
    lines = []
    started, _, _ = build_run(demo_recipe, [*small_demo_bindings, f"experiment.pretrained = '{path}'"], echo=lines.append)
    assert any(line.startswith(f"loaded {len(trained.state_dict()) - 1} tensors from {path}") for line in lines)  # the tied decoder once
    for (name, expected), (_, loaded) in zip(trained.state_dict().items(), started.state_dict().items()):
        assert torch.equal(expected, loaded), name


def test_a_pretrained_checkpoint_that_maps_onto_nothing_is_refused(demo_recipe, small_demo_bindings, tmp_path):
    task, _, _ = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    path = save_checkpoint(task, tmp_path, 1, "recipe")
    with pytest.raises(CheckpointError, match="none of its tensors maps onto PretrainingTask"):
        load_pretrained(task, path, {"nowhere.": "model."})


def test_segment_b_from_a_needs_a_task_with_a_vlbert(demo_recipe, small_demo_bindings):
    with pytest.raises(RecipeError, match="PretrainingTask has no `vlbert`"):
        build_run(demo_recipe, [*small_demo_bindings, "experiment.segment_b_from_a = True"], echo=lambda *_: None)


def test_learning_rate_scaling_and_triangle_schedule():
    assert scaled_learning_rate(1e-7, 128 + 128, 1) == pytest.approx(2.56e-5)
    assert scaled_learning_rate(1e-7, 64 + 64, 2) == pytest.approx(2.56e-5)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = warmup_linear_schedule(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_gradient_accumulation_consumes_more_samples_per_step(demo_recipe, small_demo_bindings, tmp_path):
    bindings = [*small_demo_bindings, "demo/Trainer.accumulation_steps = 2", "demo/Trainer.total_steps = 5"]
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=lambda *_: None)
    records = [r for r in read_log(tmp_path / "metrics.jsonl") if "split" not in r]
    # 5 steps x 2 micro-batches x 16 samples; counts of masked tokens add up over 10 micro-batches
    assert records[-1]["step"] == 5
    assert records[-1]["mlm/count"] > 5 * 16 * 2  # more than one masked token per caption on average


def test_no_weight_decay_on_biases_and_layer_norms_and_tied_weights_once():
    embedding = torch.nn.Embedding(5, 2)
    head = torch.nn.Linear(2, 5)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), head)
    optimizer = build_adamw(model, 1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 2  # embedding (= head weight), linear weight
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 4  # 2 biases, LayerNorm weight and bias
