"""Mixed precision: `fp32`, `bf16` or `fp16` autocast, and the gradient scaler fp16 needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from vlblocks.contracts import Echo
from vlblocks.train.onednn_linear import MIN_MULTIPLY_ADDS, OneDnnLinears, onednn_linear_available

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run computes on `device`: `name` is 'fp32' (no autocast), 'bf16' or 'fp16'
    (autocast to that dtype for matmuls and convolutions; parameters, optimiser state and
    checkpoints stay float32; LayerNorm, softmax and the losses run in float32).

    `onednn_linears`: in fp32 on a CPU, run the linear layers of at least
    `onednn_min_multiply_adds` on oneDNN (`OneDnnLinears`) rather than the BLAS library, where
    this PyTorch build has it."""

    name: str
    device: torch.device
    onednn_linears: bool = False
    onednn_min_multiply_adds: int = MIN_MULTIPLY_ADDS

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype, None for fp32."""
        return _DTYPES[self.name]

    @property
    def routes_linears_to_onednn(self) -> bool:
        """Whether `autocast()` sends the linear layers to oneDNN: asked for, fp32, a CPU, and a build that has it."""
        return self.onednn_linears and self.dtype is None and self.device.type == "cpu" and onednn_linear_available()

    def autocast(self) -> ContextManager:
        """The context the forward passes (and losses) run in."""
        if self.dtype is not None:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return OneDnnLinears(self.onednn_min_multiply_adds) if self.routes_linears_to_onednn else contextlib.nullcontext()

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A dynamic loss scaler for fp16 (it skips steps whose gradients overflow), else None."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def resolve_precision(
    requested: str, device: torch.device, from_recipe: bool, echo: Echo = print, onednn_linears: bool = False,
    onednn_min_multiply_adds: int = MIN_MULTIPLY_ADDS,
) -> Precision:
    """The precision a run uses on `device`.

    A recipe's fp16 (the official fp16 configs') is for GPUs: on a CPU, where float16 matmuls
    are emulated, a run uses fp32 instead and says so. Asked for explicitly (`--precision`),
    every precision is used as asked.
    """
    if from_recipe and requested == "fp16" and device.type == "cpu":
        echo("the recipe trains in fp16, which is for GPUs: this CPU run uses fp32 (--precision fp16 insists)")
        requested = "fp32"
    return Precision(requested, device, onednn_linears, onednn_min_multiply_adds)
