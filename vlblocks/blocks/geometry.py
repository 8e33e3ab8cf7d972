"""Box features: the sinusoidal embedding of the image-normalised box (VL-BERT), or the normalised corners (LXMERT)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class RegionGeometryEmbedding(nn.Module):
    """Encodes each box as sin/cos features of its normalised centre and size.

    For a box (x1, y1, x2, y2) in an image of width w and height h, the four coordinates
    (xc/w, yc/h, bw/w, bh/h), with xc = (x1 + x2) / 2 and bw = x2 - x1 (no +1), are multiplied by
    `scale` and divided by `wavelength ** (i / dim)` for i = 0..dim-1. Each coordinate gives
    `dim` sines followed by `dim` cosines; the four coordinates are concatenated in the order
    (xc, yc, bw, bh). With the defaults this is VL-BERT's 2048-d box feature.

    Args:
        dim: frequencies per coordinate (output size is 8 * dim).
        wavelength: base of the geometric frequency progression.
        scale: factor applied to the normalised coordinates before the frequencies.

    Inputs:
        boxes: [..., 4] (x1, y1, x2, y2) in pixels.
        image_sizes: [..., 2] (width, height), broadcastable against `boxes[..., :2]`
            (for [B, N, 4] boxes pass [B, 1, 2] or [B, 2], which is unsqueezed).

    Returns:
        [..., 8 * dim] features.
    """

    def __init__(self, dim: int = 256, wavelength: float = 1000.0, scale: float = 100.0) -> None:
        super().__init__()
        self.dim = dim
        self.wavelength = wavelength
        self.scale = scale

    @property
    def out_features(self) -> int:
        return 8 * self.dim

    def forward(self, boxes: Tensor, image_sizes: Tensor) -> Tensor:
        if boxes.shape[-1] != 4:
            raise ValueError(f"boxes must end in 4 coordinates, got shape {tuple(boxes.shape)}")
        if image_sizes.dim() == boxes.dim() - 1:
            image_sizes = image_sizes.unsqueeze(-2)
        x1, y1, x2, y2 = boxes.unbind(-1)
        centre_and_size = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
        width_height_twice = torch.cat([image_sizes, image_sizes], dim=-1).to(boxes.dtype)
        coordinates = centre_and_size / width_height_twice * self.scale
        exponents = torch.arange(self.dim, dtype=boxes.dtype, device=boxes.device) / self.dim
        frequencies = self.wavelength**exponents
        phases = coordinates.unsqueeze(-1) / frequencies  # [..., 4, dim]
        features = torch.stack([phases.sin(), phases.cos()], dim=-2)  # [..., 4, 2, dim]
        return rearrange(features, "... coord fn freq -> ... (coord fn freq)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, wavelength={self.wavelength}, scale={self.scale}"


class BoxCoordinates(nn.Module):
    """The box's corners divided by the image size: (x1/w, y1/h, x2/w, y2/h), LXMERT's `visual_pos`.

    Inputs: boxes [..., 4] pixels; image_sizes [..., 2] (width, height), as `RegionGeometryEmbedding`.
    Returns: [..., 4].
    """

    out_features = 4

    def forward(self, boxes: Tensor, image_sizes: Tensor) -> Tensor:
        if boxes.shape[-1] != 4:
            raise ValueError(f"boxes must end in 4 coordinates, got shape {tuple(boxes.shape)}")
        if image_sizes.dim() == boxes.dim() - 1:
            image_sizes = image_sizes.unsqueeze(-2)
        return boxes / torch.cat([image_sizes, image_sizes], dim=-1).to(boxes.dtype)
