"""`Dropout` that keeps a one-byte mask for the backward pass on every device."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    """`nn.Dropout` with the same random draws, values and gradients, through `torch.native_dropout`.

    On a CPU, `nn.Dropout` keeps its scaled mask in the input's dtype for the backward pass (4
    bytes per element in float32); `native_dropout` keeps a bool mask (1 byte), as CUDA's fused
    dropout already does: after the forward pass of the benchmark's BASE step (batch 8, fp32),
    399 instead of 433 MiB of activations (docs/performance.md). In float32 and float64 the
    numbers are bit-identical to `nn.Dropout`'s; in bfloat16 and float16 the same elements are
    dropped, and a kept value may differ in its last bits (the two round the scale 1 / (1 - p)
    and the product differently).

    Inputs: x [...]. Returns: [...], x itself in eval mode or when p is 0.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]
