"""Mixed precision: `fp32`, `bf16` or `fp16` autocast, and the gradient scaler fp16 needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from vlblocks.contracts import Echo

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run computes on `device`: `name` is 'fp32' (no autocast), 'bf16' or 'fp16'
    (autocast to that dtype for matmuls and convolutions; parameters, optimiser state and
    checkpoints stay float32; LayerNorm, softmax and the losses run in float32)."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype, None for fp32."""
        return _DTYPES[self.name]

    def autocast(self) -> ContextManager:
        """The context the forward passes (and losses) run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A dynamic loss scaler for fp16 (it skips steps whose gradients overflow), else None."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def resolve_precision(requested: str, device: torch.device, from_recipe: bool, echo: Echo = print) -> Precision:
    """The precision a run uses on `device`.

    A recipe's fp16 (the official fp16 configs') is for GPUs: on a CPU, where float16 matmuls
    are emulated, a run uses fp32 instead and says so. Asked for explicitly (`--precision`),
    every precision is used as asked.
    """
    if from_recipe and requested == "fp16" and device.type == "cpu":
        echo("the recipe trains in fp16, which is for GPUs: this CPU run uses fp32 (--precision fp16 insists)")
        requested = "fp32"
    return Precision(requested, device)
