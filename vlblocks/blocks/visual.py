"""Region representation: box geometry and appearance fused into one vector per region."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from vlblocks.blocks.dropout import Dropout
from vlblocks.blocks.geometry import BoxCoordinates, RegionGeometryEmbedding
from vlblocks.blocks.normalization import LayerNorm

DEFAULT_GEOMETRY = "sinusoidal"


def _check_size(appearance: Tensor, expected: int) -> None:
    if appearance.shape[-1] != expected:
        raise ValueError(f"appearance features have size {appearance.shape[-1]}, the embedding expects {expected}")


def _padding_zeroed(vectors: Tensor, region_mask: Optional[Tensor]) -> Tensor:
    """[B, N, H] with padded regions (`region_mask` False) exactly 0; as they are without a mask."""
    return vectors if region_mask is None else vectors.masked_fill(~region_mask.bool().unsqueeze(-1), 0.0)


class VisualFeatureEmbedding(nn.Module):
    """VL-BERT's region feature: ReLU(Linear(Dropout([geometry ; appearance]))); with
    `geometry=None, activation=None` it is VisualBERT's, a Linear projection of the appearance.

    The geometry features come first, then the appearance features: the official
    `obj_downsample` weights of shape [H, 4096] assume that order. The parameters are named
    `projection.weight` / `projection.bias`.

    Args:
        appearance_size: size of each region's appearance feature (2048 for ResNet C5).
        out_features: output size (VL-BERT's `IMAGE_FINAL_DIM`, equal to the hidden size).
        geometry: the box embedding (a module with `out_features` mapping boxes and image sizes
            to features); the default "sinusoidal" is `RegionGeometryEmbedding()` (2048-d);
            None: appearance only.
        dropout: dropout on the concatenated input.
        activation: "relu" (VL-BERT) or None (a plain projection).
        zero_padding: padded regions (`region_mask` False) give exactly 0 (VL-BERT); False
            embeds whatever feature the padding holds (transformers' VisualBERT), which only the
            padded slots' own outputs ever see.

    Inputs:
        appearance: [B, N, appearance_size].
        boxes: [B, N, 4] (x1, y1, x2, y2) pixels.
        image_sizes: [B, 2] (width, height).
        region_mask: optional [B, N] bool, True at real regions.

    Returns:
        [B, N, out_features]; exactly 0 at padded regions when `region_mask` is given and
        `zero_padding` (the official FastRCNN `obj_reps` are zero-padded after
        `obj_downsample`), not ReLU(bias).
    """

    def __init__(
        self,
        appearance_size: int = 2048,
        out_features: int = 768,
        geometry: Union[nn.Module, str, None] = DEFAULT_GEOMETRY,
        dropout: float = 0.1,
        activation: Optional[Literal["relu"]] = "relu",
        zero_padding: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(geometry, str):
            if geometry != DEFAULT_GEOMETRY:
                raise ValueError(f"geometry must be a module, None or {DEFAULT_GEOMETRY!r}, not {geometry!r}")
            geometry = RegionGeometryEmbedding()
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, not {activation!r}")
        self.geometry = geometry
        self.dropout = Dropout(dropout)
        geometry_size = geometry.out_features if geometry is not None else 0
        self.projection = nn.Linear(geometry_size + appearance_size, out_features)
        self.appearance_size = appearance_size
        self.out_features = out_features
        self.activation = activation
        self.zero_padding = zero_padding

    def forward(self, appearance: Tensor, boxes: Tensor, image_sizes: Tensor, region_mask: Optional[Tensor] = None) -> Tensor:
        _check_size(appearance, self.appearance_size)
        fused = appearance
        if self.geometry is not None:
            fused = torch.cat([self.geometry(boxes, image_sizes).to(appearance.dtype), appearance], dim=-1)
        vectors = self.projection(self.dropout(fused))
        if self.activation == "relu":
            vectors = torch.relu(vectors)
        return _padding_zeroed(vectors, region_mask) if self.zero_padding else vectors


class AveragedRegionFeatureEmbedding(nn.Module):
    """LXMERT's region feature: `Dropout((LN(W_f f) + LN(W_b b)) / 2)` of the appearance f and a
    box feature b (by default the 4-d box normalised by the image size).

    Args:
        appearance_size: D. out_features: H.
        geometry: the box feature module (`out_features`, (boxes, image sizes) → features);
            default `BoxCoordinates()`.
        dropout: dropout on the average.
        layer_norm_eps: epsilon of both LayerNorms.
        zero_padding: as `VisualFeatureEmbedding` (transformers' LXMERT embeds the padding).

    Parameters: `appearance_projection`, `appearance_norm`, `box_projection`, `box_norm`.

    Inputs / Returns: as `VisualFeatureEmbedding` ([B, N, H], 0 at padded regions when
        `region_mask` is given).
    """

    def __init__(
        self,
        appearance_size: int = 2048,
        out_features: int = 768,
        geometry: Optional[nn.Module] = None,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        zero_padding: bool = True,
    ) -> None:
        super().__init__()
        self.geometry = geometry if geometry is not None else BoxCoordinates()
        self.zero_padding = zero_padding
        self.appearance_projection = nn.Linear(appearance_size, out_features)
        self.appearance_norm = LayerNorm(out_features, eps=layer_norm_eps)
        self.box_projection = nn.Linear(self.geometry.out_features, out_features)
        self.box_norm = LayerNorm(out_features, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.appearance_size = appearance_size
        self.out_features = out_features

    def forward(self, appearance: Tensor, boxes: Tensor, image_sizes: Tensor, region_mask: Optional[Tensor] = None) -> Tensor:
        _check_size(appearance, self.appearance_size)
        appearance_part = self.appearance_norm(self.appearance_projection(appearance))
        box_part = self.box_norm(self.box_projection(self.geometry(boxes, image_sizes).to(appearance.dtype)))
        vectors = self.dropout((appearance_part + box_part) / 2)
        return _padding_zeroed(vectors, region_mask) if self.zero_padding else vectors
