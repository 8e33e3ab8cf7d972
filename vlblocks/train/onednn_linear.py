"""float32 linear layers on the CPU through oneDNN instead of the BLAS library PyTorch calls.

PyTorch's CPU wheels run `F.linear`'s float32 matmuls through MKL, and its oneDNN matmul only in
reduced precision (`torch.backends.mkldnn.matmul.fp32_precision = 'bf16'`). On the 2-core AMD
EPYC this project develops on, oneDNN ran BASE's linear products inside the fp32 pre-training
step at 180 GFLOP/s against MKL's 131-135, at full float32 precision, and took 5.5-13.5% off the
whole step (docs/performance.md). `OneDnnLinears` sends each float32 CPU `F.linear` (every
`nn.Linear`) to oneDNN's kernel for the forward product and the input gradient; the weight
gradient, whose shapes oneDNN did not run faster, stays `torch.mm`. Only products of at least
`MIN_MULTIPLY_ADDS` (rows x inputs x outputs) go to oneDNN: each oneDNN call costs a fixed
0.1-0.2 ms more than MKL's, so a small layer's forward + backward ran slower on oneDNN (0.72x at
552 x 64 x 64, the tests' size), the two were even at 2^25-2^27 multiply-adds, and BASE's layers
(2^28 and more) ran 1.08-1.09x faster (`python bench/step_leads.py`).

The results are float32 products, rounded as oneDNN sums them rather than as MKL does: they
differ from `F.linear`'s in the last bits, and repeat bit for bit from run to run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

MIN_MULTIPLY_ADDS = 2**26  # by default, smaller products stay on the BLAS, where they were faster


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN, enabled (`torch.backends.mkldnn.enabled`), and the
    dense-input linear kernel used here."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_product(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) → [M, N], on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` with oneDNN products: x [..., K], weight [N, K], bias [N] or None → [..., N]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return onednn_product(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_product(grad_rows, weight.t(), None).reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _takes(x: Tensor, weight: Tensor, bias: Optional[Tensor], min_multiply_adds: int) -> bool:
    """Plain float32 CPU tensors or parameters (no subclass such as DTensor), outside CPU autocast,
    shapes that match (a contiguous [N] bias or none: the kernel reads no other bias layout right),
    and a product of at least `min_multiply_adds` (and at least one). Anything else is
    `F.linear`'s, with its own broadcasting and errors."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous()))
        and x.numel() * weight.shape[0] >= max(min_multiply_adds, 1)
        and not torch.is_autocast_enabled("cpu")
    )


class OneDnnLinears(TorchFunctionMode):
    """Inside it, every float32 CPU `F.linear` of at least `min_multiply_adds` (rows x inputs x
    outputs) runs on oneDNN (`OneDnnLinear`); any other call (smaller, another dtype or device,
    autocast, tensor subclasses) runs as it would without it.

    The backward pass needs no mode: the recorded `OneDnnLinear` nodes run their own products.
    """

    def __init__(self, min_multiply_adds: int = MIN_MULTIPLY_ADDS) -> None:
        super().__init__()
        self.min_multiply_adds = min_multiply_adds

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if _takes(x, weight, bias, self.min_multiply_adds):
                return OneDnnLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


def _linear_arguments(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`F.linear`'s arguments, whether passed by position or by name."""
    return input, weight, bias
