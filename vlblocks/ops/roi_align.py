"""`roi_align` in pure PyTorch, reproducing ``torchvision.ops.roi_align`` exactly (the module form
is `vlblocks.blocks.RoIAlign`)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["output_pair", "roi_align"]


def output_pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    """`output_size` as positive (out_h, out_w); an int gives a square. ValueError otherwise."""
    sizes = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else output_size
    if len(sizes) != 2 or any(isinstance(s, bool) for s in sizes):
        raise ValueError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    try:
        out_h, out_w = (operator.index(s) for s in sizes)
    except TypeError:
        raise ValueError(f"output_size must be an int or a pair of ints, got {output_size!r}") from None
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return out_h, out_w


def _roi_table(rois: Tensor | list[Tensor], features: Tensor) -> Tensor:
    """Rois as a detached [K, 5] tensor in the dtype and device of ``features``."""
    like = {"dtype": features.dtype, "device": features.device}
    if isinstance(rois, (list, tuple)):
        if len(rois) > features.shape[0]:
            raise ValueError(f"got {len(rois)} box tensors for a batch of {features.shape[0]} images")
        rows = []
        for i, boxes in enumerate(rois):
            if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
                shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
                raise ValueError(f"rois[{i}] must be a [K_i, 4] tensor, got {shape}")
            boxes = boxes.detach().to(**like)
            rows.append(torch.cat([torch.full_like(boxes[:, :1], i), boxes], dim=1))
        return torch.cat(rows) if rows else torch.zeros(0, 5, **like)
    if not isinstance(rois, Tensor):
        raise ValueError(f"rois must be a [K, 5] tensor or a list of [K_i, 4] tensors, got {type(rois).__name__}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape [K, 5], got {tuple(rois.shape)}")
    return rois.detach().to(**like)


def _axis_samples(
    start: Tensor, end: Tensor, bins: int, size: int, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for every RoI, bin and sample.

    Returns ``index`` and ``weight`` of shape [K, bins, G, 2] (low and high
    neighbour; weight 0 for samples that are padding or off the map) and the
    per-RoI sample count ``grid`` [K], where G is the largest count.
    """
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)  # torchvision forces malformed RoIs to 1 px
    bin_size = length / bins
    if sampling_ratio > 0:
        grid = torch.full_like(start, sampling_ratio, dtype=torch.long)
        g_max = sampling_ratio
    else:
        # Negative sizes (aligned) give ceil <= 0, i.e. no samples, as in the kernel's empty loop;
        # non-finite boxes (undefined in the kernel) also get none.
        grid = torch.ceil(length / bins).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp(min=0.0).long()
        g_max = int(grid.max()) if grid.numel() else 1  # one sync: a shape size
    g_max = max(g_max, 1)

    like = {"dtype": start.dtype, "device": start.device}
    b = torch.arange(bins, **like)[:, None]
    i = torch.arange(g_max, **like)
    bin_size = bin_size[:, None, None]
    # Same operation order as the C++ kernel, so threshold tests (ceil, <= size) agree bit for bit.
    divisor = grid.clamp(min=1)[:, None, None].to(start.dtype)
    coord = (start[:, None, None] + b * bin_size) + (i + 0.5) * bin_size / divisor

    valid = (coord >= -1.0) & (coord <= size) & (i < grid[:, None, None])  # NaN fails too
    coord = torch.where(valid, coord, 0.0).clamp(min=0.0)
    low = coord.long()  # truncation == floor here since coord >= 0
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    high = torch.where(at_edge, low, low + 1)
    frac = coord - low
    index = torch.stack([low, high], dim=-1)
    weight = torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None]
    return index, weight, grid


def roi_align(
    features: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    validate: bool = True,
) -> Tensor:
    """Average-pool bilinear samples of ``features`` over a grid of bins in each RoI.

    Reproduces ``torchvision.ops.roi_align`` (the Detectron2 kernel) for every
    argument, including tiny, inverted and off-map boxes. Each bin averages
    ``grid_h * grid_w`` bilinear samples, with ``grid = sampling_ratio`` if it is
    positive, else ``ceil(roi_size / bins)`` per RoI and axis; samples more than
    one pixel off the map count as zero.

    Vectorised over RoIs: per axis, every RoI gets sample coordinates up to the
    largest grid in the batch (padding masked to weight 0). Because bilinear
    weights factor as ``w_y * w_x`` and the off-map test is an AND of the two
    axes, the four neighbours of every sample are flat indices
    ``(n * H + y) * W + x`` into a ``[(N H W), C]`` table, and
    ``F.embedding_bag`` gathers, weights and sums them in one call, without a
    tensor that has both a channel axis and a sample axis.

    Memory: a channels-last copy of ``features`` (N*H*W*C) plus index (int64)
    and weight tables of ``K * out_h * out_w * 4 * G_h * G_w`` entries, where
    ``G = sampling_ratio`` or the largest adaptive grid among the RoIs; the
    output is ``K * C * out_h * out_w``. The adaptive case costs one host sync
    to read that largest grid.

    Gradients flow to ``features`` only (the adjoint of the same sampling,
    equal to torchvision's backward); box coordinates are detached, so ``rois``
    never receives a gradient.

    Args:
        output_size: ``(out_h, out_w)``, or an int for a square output.
        spatial_scale: factor from box (input-image pixel) coordinates to
            feature-map coordinates, e.g. 1/16 for a stride-16 map.
        sampling_ratio: samples per bin along each axis if > 0; adaptive if <= 0.
        aligned: shift boxes by -0.5 px so that pixel centres align (no 1 px
            minimum size is then applied).
        validate: check that every RoI's batch index names an image (a host sync);
            False for callers that build the RoIs from the batch themselves.

    Inputs:
        features: [N, C, H, W] float tensor.
        rois: [K, 5] rows ``(batch_index, x1, y1, x2, y2)``, or a list of up to
            N tensors [K_i, 4] whose position is the batch index.

    Returns:
        [K, C, out_h, out_w] tensor in the dtype and device of ``features``.
    """
    if not isinstance(features, Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [N, C, H, W] tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got {features.dtype}")
    n_img, channels, height, width = features.shape
    if height == 0 or width == 0:
        raise ValueError(f"features must have a non-empty spatial size, got {height}x{width}")
    out_h, out_w = output_pair(output_size)
    sampling_ratio = operator.index(sampling_ratio)

    table = _roi_table(rois, features)
    n_rois = table.shape[0]
    batch = table[:, 0].long()  # the kernel casts to int, i.e. truncates
    bad = (batch < 0) | (batch >= n_img)
    if validate and n_rois and bool(bad.any()):
        raise ValueError(
            f"rois batch indices must lie in [0, {n_img - 1}] after int truncation, "
            f"got {table[bad, 0][:5].tolist()}"
        )

    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (table[:, 1:] * spatial_scale - offset).unbind(dim=1)
    y_index, y_weight, grid_h = _axis_samples(y1, y2, out_h, height, sampling_ratio, aligned)
    x_index, x_weight, grid_w = _axis_samples(x1, x2, out_w, width, sampling_ratio, aligned)

    rows = batch[:, None, None, None] * height + y_index
    index = rearrange(rows, "k ph gy cy -> k ph 1 (gy cy) 1") * width + rearrange(
        x_index, "k pw gx cx -> k 1 pw 1 (gx cx)"
    )
    weight = rearrange(y_weight, "k ph gy cy -> k ph 1 (gy cy) 1") * rearrange(
        x_weight, "k pw gx cx -> k 1 pw 1 (gx cx)"
    )
    values = F.embedding_bag(
        rearrange(index, "k ph pw sy sx -> (k ph pw) (sy sx)"),
        rearrange(features, "n c h w -> (n h w) c"),
        per_sample_weights=rearrange(weight, "k ph pw sy sx -> (k ph pw) (sy sx)"),
        mode="sum",
    )
    count = (grid_h * grid_w).clamp(min=1).to(features.dtype)
    out = rearrange(values, "(k ph pw) c -> k c ph pw", k=n_rois, ph=out_h, pw=out_w)
    return (out / count[:, None, None, None]).contiguous()
