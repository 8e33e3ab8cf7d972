"""Region representation: box geometry and appearance fused into one vector per region."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlblocks.blocks.geometry import RegionGeometryEmbedding


class VisualFeatureEmbedding(nn.Module):
    """VL-BERT's region feature: ReLU(Linear(Dropout([geometry ; appearance]))).

    The geometry features come first, then the appearance features: the official
    `obj_downsample` weights of shape [H, 4096] assume that order. The parameters are named
    `projection.weight` / `projection.bias`.

    Args:
        appearance_size: size of each region's appearance feature (2048 for ResNet C5).
        out_features: output size (VL-BERT's `IMAGE_FINAL_DIM`, equal to the hidden size).
        geometry: the box embedding; default `RegionGeometryEmbedding()` (2048-d).
        dropout: dropout on the concatenated input.

    Inputs:
        appearance: [B, N, appearance_size].
        boxes: [B, N, 4] (x1, y1, x2, y2) pixels.
        image_sizes: [B, 2] (width, height).
        region_mask: optional [B, N] bool, True at real regions.

    Returns:
        [B, N, out_features]; exactly 0 at padded regions when `region_mask` is given (the
        official FastRCNN `obj_reps` are zero-padded after `obj_downsample`), not ReLU(bias).
    """

    def __init__(
        self,
        appearance_size: int = 2048,
        out_features: int = 768,
        geometry: Optional[RegionGeometryEmbedding] = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.geometry = geometry if geometry is not None else RegionGeometryEmbedding()
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(self.geometry.out_features + appearance_size, out_features)
        self.appearance_size = appearance_size
        self.out_features = out_features

    def forward(self, appearance: Tensor, boxes: Tensor, image_sizes: Tensor, region_mask: Optional[Tensor] = None) -> Tensor:
        if appearance.shape[-1] != self.appearance_size:
            raise ValueError(
                f"appearance features have size {appearance.shape[-1]}, the embedding expects {self.appearance_size}"
            )
        geometry = self.geometry(boxes, image_sizes).to(appearance.dtype)
        fused = torch.cat([geometry, appearance], dim=-1)
        vectors = torch.relu(self.projection(self.dropout(fused)))
        if region_mask is None:
            return vectors
        return vectors.masked_fill(~region_mask.bool().unsqueeze(-1), 0.0)
