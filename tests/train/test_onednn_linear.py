"""fp32 linear layers on oneDNN (`OneDnnLinears`): float32-accurate products and gradients,
repeatable bit for bit, everything else passed through, on by default in CPU training.

The tests' layers are small, and by default products under `MIN_MULTIPLY_ADDS` stay on the BLAS
(where they are faster), so these tests lower the bar to send every size to oneDNN."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlblocks.app.run import train_from_recipe
from vlblocks.train.loop import Trainer
from vlblocks.train.onednn_linear import OneDnnLinears, onednn_linear_available
from vlblocks.train.precision import Precision

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear kernel")


def quiet(*_):
    return None


EVERY_SIZE = OneDnnLinears(min_multiply_adds=0)


def node_name(output):
    return type(output.grad_fn).__name__


def linear_and_gradients(x, weight, bias, mode):
    """F.linear's output and the gradients of a fixed function of it, as (output, dx, dweight, dbias)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    with mode:
        output = F.linear(x, weight, bias)
    (output.sin() * torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)).sum().backward()
    return output, x.grad, weight.grad, bias.grad if bias is not None else None


@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_linears_run_on_onednn_with_float32_accuracy(with_bias):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 37, 96, generator=generator), torch.randn(80, 96, generator=generator) / 10
    bias = torch.randn(80, generator=generator) if with_bias else None
    onednn = linear_and_gradients(x, weight, bias, EVERY_SIZE)
    assert node_name(onednn[0]) == "OneDnnLinearBackward"
    reference = linear_and_gradients(x.double(), weight.double(), bias.double() if with_bias else None, EVERY_SIZE)
    assert node_name(reference[0]) != "OneDnnLinearBackward"  # float64 passes through to F.linear
    for name, got, want in zip(["output", "input gradient", "weight gradient", "bias gradient"], onednn, reference):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_the_products_repeat_bit_for_bit():  # BASE's feed-forward shape, over the default bar
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(552, 768, generator=generator), torch.randn(3072, 768, generator=generator), torch.randn(3072, generator=generator)
    runs = [linear_and_gradients(x, weight, bias, OneDnnLinears()) for _ in range(3)]
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            assert torch.equal(got, first)


def test_what_onednn_does_not_take_runs_as_without_the_mode():
    weight = torch.randn(8, 4, requires_grad=True)
    with EVERY_SIZE:
        assert node_name(F.linear(torch.randn(5, 4), weight)) == "OneDnnLinearBackward"
        assert node_name(F.linear(torch.randn(4), weight)) == "OneDnnLinearBackward"  # one vector
        empty = F.linear(torch.randn(0, 4), weight)
        assert empty.shape == (0, 8) and node_name(empty) != "OneDnnLinearBackward"
        assert node_name(F.linear(torch.randn(5, 4).double(), weight.double())) != "OneDnnLinearBackward"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = F.linear(torch.randn(5, 4), weight)
        assert low.dtype == torch.bfloat16 and node_name(low) != "OneDnnLinearBackward"
        assert (torch.randn(3, 4) @ torch.randn(4, 2)).shape == (3, 2)  # other functions pass through
        # Biases the kernel would misread, and mismatched shapes, keep F.linear's results and errors.
        x, bias = torch.randn(5, 4), torch.randn(16)
        for odd in (torch.tensor(1.0), bias[::2], torch.randn(1), torch.randn(1).expand(8)):
            out = F.linear(x, weight, odd)
            assert node_name(out) != "OneDnnLinearBackward"
            torch.testing.assert_close(out, x @ weight.t() + odd)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            F.linear(torch.randn(5, 3), weight)


def test_small_products_stay_on_the_blas_by_default():
    with OneDnnLinears():
        under = F.linear(torch.randn(2**10, 2**8), torch.randn(2**8 - 1, 2**8, requires_grad=True))  # 2^26 - 2^18 multiply-adds
        over = F.linear(torch.randn(2**10, 2**8), torch.randn(2**8, 2**8, requires_grad=True))
    assert node_name(under) != "OneDnnLinearBackward" and node_name(over) == "OneDnnLinearBackward"


def test_only_fp32_on_a_cpu_routes_linears_and_the_trainer_asks_unless_compiling():
    assert Precision("fp32", CPU, onednn_linears=True).routes_linears_to_onednn
    assert not Precision("fp32", CPU).routes_linears_to_onednn
    assert not Precision("bf16", CPU, onednn_linears=True).routes_linears_to_onednn
    assert not Precision("fp32", torch.device("cuda"), onednn_linears=True).routes_linears_to_onednn
    with Precision("fp32", CPU, onednn_linears=True, onednn_min_multiply_adds=0).autocast():
        assert node_name(F.linear(torch.randn(2, 3), torch.randn(4, 3, requires_grad=True))) == "OneDnnLinearBackward"
    assert Trainer().resolve_precision(CPU, quiet).routes_linears_to_onednn
    assert not Trainer(onednn_linears=False).resolve_precision(CPU, quiet).routes_linears_to_onednn
    assert not Trainer(compile="eager").resolve_precision(CPU, quiet).routes_linears_to_onednn
    assert Trainer(onednn_min_multiply_adds=5).resolve_precision(CPU, quiet).onednn_min_multiply_adds == 5


def test_training_with_onednn_linears_ends_where_training_without_them_does(demo_recipe, small_demo_bindings, tmp_path):
    short = [*small_demo_bindings, "demo/Trainer.total_steps = 3", "demo/Trainer.warmup_steps = 0", "demo/Trainer.eval_batches = 1",
             "demo/Trainer.onednn_min_multiply_adds = 0"]
    lines = []
    train_from_recipe(demo_recipe, short, tmp_path / "onednn", echo=lines.append)
    assert "computing on cpu in fp32, large linear layers on oneDNN" in lines
    lines = []
    train_from_recipe(demo_recipe, [*short, "demo/Trainer.onednn_linears = False"], tmp_path / "blas", echo=lines.append)
    assert "computing on cpu in fp32" in lines
    onednn = load_file(tmp_path / "onednn" / "checkpoints" / "step-0000003" / "model.safetensors")
    blas = load_file(tmp_path / "blas" / "checkpoints" / "step-0000003" / "model.safetensors")
    for name, weight in blas.items():
        torch.testing.assert_close(onednn[name], weight, rtol=1e-4, atol=1e-5, msg=name)
