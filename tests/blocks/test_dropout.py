"""`Dropout` draws, scales and back-propagates exactly as `nn.Dropout`, keeping a bool mask."""

import pytest
import torch
from torch import nn

from vlblocks.blocks.dropout import Dropout


def dropped(module, x, gradient):
    """(output, input gradient, the next random number) from seed 3, and the bytes saved for backward."""
    saved = []
    x = x.clone().requires_grad_()
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = module(x)
    y.backward(gradient)
    return (y.detach(), x.grad, torch.rand(3)), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_draws_values_and_gradients_as_nn_dropout_with_a_one_byte_mask(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 69, 96, generator=generator).to(dtype)
    gradient = torch.randn(8, 69, 96, generator=generator).to(dtype)
    ours, kept = dropped(Dropout(0.1).train(), x, gradient)
    reference, _ = dropped(nn.Dropout(0.1).train(), x, gradient)
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)
    assert [(t.dtype, t.shape) for t in kept] == [(torch.bool, x.shape)]
    assert 0.05 < 1 - kept[0].float().mean().item() < 0.15


def test_half_precision_drops_the_same_elements_and_keeps_values_within_rounding():
    x = torch.randn(8, 69, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    (y, _, after), _ = dropped(Dropout(0.1).train(), x, torch.ones_like(x))
    (reference, _, reference_after), _ = dropped(nn.Dropout(0.1).train(), x, torch.ones_like(x))
    assert torch.equal(y == 0, reference == 0) and torch.equal(after, reference_after)
    assert ((y.double() - reference.double()).abs() <= reference.double().abs() * 2**-6).all(), "two bfloat16 steps"


def test_eval_mode_and_p_zero_pass_the_input_through():
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
