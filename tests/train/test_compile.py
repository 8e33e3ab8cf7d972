"""`Trainer.compile`: the task's forward under torch.compile trains the same weights as eager
and writes checkpoints an eager task loads strictly. The 'eager' backend captures the forward
with dynamo, as every backend does, and runs the captured graph as it is: inductor's code
generation takes minutes on this CPU and belongs in bench/, not in a test. One step (one graph
for training, one for the validation at the end) keeps the capture to about 10 s."""

import pytest
import torch
from safetensors.torch import load_file

from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.train.checkpoint import load_checkpoint
from vlblocks.train.loop import Trainer


def quiet(*_):
    return None


@pytest.fixture
def short(small_demo_bindings):
    return [*small_demo_bindings, "demo/Trainer.total_steps = 1", "demo/Trainer.warmup_steps = 0", "demo/Trainer.log_every = 1", "demo/Trainer.eval_batches = 1"]


def test_a_compiled_forward_trains_the_eager_weights(demo_recipe, short, tmp_path):
    lines = []
    train_from_recipe(demo_recipe, short, tmp_path / "eager", echo=quiet)
    train_from_recipe(demo_recipe, [*short, "demo/Trainer.compile = 'eager'"], tmp_path / "compiled", echo=lines.append)
    assert any("torch.compile (backend 'eager')" in line for line in lines)

    eager = load_file(tmp_path / "eager" / "checkpoints" / "step-0000001" / "model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "checkpoints" / "step-0000001" / "model.safetensors")
    assert eager.keys() == compiled.keys()
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    task, _, _ = build_run(demo_recipe, short, echo=quiet)
    initial = task.state_dict()
    moved = sum(not torch.equal(initial[name], weight) for name, weight in eager.items())
    assert moved > len(eager) // 2  # the comparison is between trained weights, not two copies of the start
    load_checkpoint(task, tmp_path / "compiled" / "checkpoints" / "step-0000001")  # strict, into an eager task


def test_an_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="Trainer.compile must be None or a torch.compile backend .*inductor.*got 'fast'"):
        Trainer(compile="fast")
