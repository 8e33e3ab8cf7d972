"""`fused=True` optimisers (`Trainer.fused_optimizer`): one kernel pass per tensor, the same
update as the loop up to float32 rounding, and state that interchanges with the loop's."""

import pytest
import torch
from safetensors.torch import load_file

from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.train.adamw import VLBertAdamW


def two_groups(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((7, 5), (5,), (3, 3))]


def optimizer(parameters, fused: bool) -> VLBertAdamW:
    groups = [{"params": parameters[:2], "weight_decay": 1e-2}, {"params": parameters[2:], "weight_decay": 0.0}]
    return VLBertAdamW(groups, lr=1e-2, eps=1e-6, fused=fused)


def step_both(loop, fused, first, second, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for index, (a, b) in enumerate(zip(first, second)):
            if step == 2 and index == 1:  # a parameter without a gradient falls a step behind the others
                a.grad = b.grad = None
                continue
            gradient = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = gradient.clone(), gradient.clone()
        loop.step()
        fused.step()


def test_the_fused_official_adamw_is_the_loop_up_to_rounding():
    looped, fused = two_groups(), two_groups()
    loop_optimizer, fused_optimizer = optimizer(looped, False), optimizer(fused, True)
    step_both(loop_optimizer, fused_optimizer, looped, fused, steps=6, seed=1)
    for a, b in zip(looped, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_optimizer.state[b][key], loop_optimizer.state[a][key], rtol=1e-6, atol=1e-9)
        assert torch.equal(fused_optimizer.state[b]["step"], loop_optimizer.state[a]["step"])
    assert [loop_optimizer.state[a]["step"].item() for a in looped] == [6, 5, 6]
    assert not torch.equal(looped[0], two_groups()[0])

    # the worked example of test_training.py: epsilon before the bias correction, decay after the update
    weight = torch.nn.Parameter(torch.ones(1))
    weight.grad = torch.full((1,), 2.0)
    VLBertAdamW([weight], lr=0.1, betas=(0.9, 0.999), eps=0.1, weight_decay=0.5, fused=True).step()
    assert weight.item() == pytest.approx(0.91319454, abs=1e-7)


def test_a_loop_state_continues_fused_and_back():
    looped, fused = two_groups(), two_groups()
    loop_optimizer, other = optimizer(looped, False), optimizer(fused, False)
    step_both(loop_optimizer, other, looped, fused, steps=3, seed=2)
    fused_optimizer = optimizer(fused, True)
    fused_optimizer.load_state_dict(other.state_dict())
    assert all(group["fused"] for group in fused_optimizer.param_groups)  # the new optimiser's choice, not the saved one
    step_both(loop_optimizer, fused_optimizer, looped, fused, steps=3, seed=3)
    for a, b in zip(looped, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_fused_needs_the_bias_correction():
    with pytest.raises(ValueError, match="fused=True needs correct_bias=True"):
        VLBertAdamW(two_groups(), correct_bias=False, fused=True)


def test_recipes_fuse_each_optimizer_and_train_the_same(demo_recipe, small_demo_bindings, tmp_path):
    for name in ("adamw", "torch_adamw", "sgd"):
        bindings = [*small_demo_bindings, f"demo/Trainer.optimizer = '{name}'", "demo/Trainer.fused_optimizer = True"]
        task, _, trainer = build_run(demo_recipe, bindings, echo=lambda *_: None)
        built, _ = trainer.build_optimizer(task, 1e-4, trainer.schedule_for(2))
        assert built.defaults["fused"] is True, name

    short = [*small_demo_bindings, "demo/Trainer.total_steps = 3", "demo/Trainer.warmup_steps = 1", "demo/Trainer.eval_batches = 1"]
    train_from_recipe(demo_recipe, short, tmp_path / "loop", echo=lambda *_: None)
    train_from_recipe(demo_recipe, [*short, "demo/Trainer.fused_optimizer = True"], tmp_path / "fused", echo=lambda *_: None)
    looped = load_file(tmp_path / "loop" / "checkpoints" / "step-0000003" / "model.safetensors")
    fused = load_file(tmp_path / "fused" / "checkpoints" / "step-0000003" / "model.safetensors")
    for name, weight in looped.items():
        torch.testing.assert_close(fused[name], weight, rtol=1e-4, atol=1e-5, msg=name)
