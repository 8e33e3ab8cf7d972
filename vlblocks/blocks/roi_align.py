"""`RoIAlign`: the module form of `vlblocks.ops.roi_align` (pure PyTorch, torchvision's semantics)."""

from __future__ import annotations

import operator

from torch import Tensor, nn

from vlblocks.ops.roi_align import output_pair, roi_align

__all__ = ["RoIAlign"]


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (same arguments and semantics).

    Args:
        output_size: ``(out_h, out_w)``, or an int for a square output.
        spatial_scale: box-to-feature-map coordinate factor (e.g. 1/16).
        sampling_ratio: samples per bin along each axis if > 0; adaptive if <= 0.
        aligned: use the half-pixel-corrected box convention.

    Inputs:
        features: [N, C, H, W].
        rois: [K, 5] ``(batch_index, x1, y1, x2, y2)`` or a list of [K_i, 4].

    Returns:
        [K, C, out_h, out_w].
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = operator.index(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, features: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
