"""`LayerNorm` that normalises in float32 (or wider) whatever the autocast dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and names) computed in at least float32, outside autocast.

    CUDA autocast already runs layer norm in float32; CPU autocast would run it in bfloat16 or
    float16. Here both get float32 statistics and a float32 output, so the residual stream of a
    mixed-precision model stays float32 (as apex's FusedLayerNorm did for VL-BERT); float64
    inputs stay float64, and a float32 model computes exactly what `nn.LayerNorm` does.

    Inputs: x [..., normalized_shape]. Returns: [...], float32 (float64 for float64 input).
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
