"""Tests for vlblocks.ops.roi_align (and its module form, vlblocks.blocks.RoIAlign) against
hand-computed values and a scalar loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlblocks.blocks.roi_align import RoIAlign
from vlblocks.ops.roi_align import roi_align

F64 = torch.float64


# --------------------------------------------------------------------------- reference


def _bilinear(fmap, y: float, x: float, height: int, width: int):
    """torchvision's bilinear_interpolate, one point, all channels of fmap [C, H, W]."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0 * fmap[:, 0, 0]
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[:, y_low, x_low]
        + hy * lx * fmap[:, y_low, x_high]
        + ly * hx * fmap[:, y_high, x_low]
        + ly * lx * fmap[:, y_high, x_high]
    )


def reference_roi_align(feat, rois, out_h, out_w, scale, sampling_ratio, aligned):
    """Scalar loop over RoIs, bins and samples. feat: numpy array or torch tensor [N, C, H, W];
    rois: rows of (batch, x1, y1, x2, y2) as Python floats. Returns a list of [C, out_h*out_w]."""
    _, _, height, width = feat.shape
    offset = 0.5 if aligned else 0.0
    result = []
    for b, bx1, by1, bx2, by2 in rois:
        fmap = feat[int(b)]
        start_w, start_h = bx1 * scale - offset, by1 * scale - offset
        end_w, end_h = bx2 * scale - offset, by2 * scale - offset
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        bins = []
        for ph in range(out_h):
            for pw in range(out_w):
                acc = 0.0 * fmap[:, 0, 0]
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc = acc + _bilinear(fmap, y, x, height, width)
                bins.append(acc / count)
        result.append(bins)
    return result


def reference_numpy(features: torch.Tensor, rois: torch.Tensor, out_hw, scale, sampling_ratio, aligned):
    out = reference_roi_align(features.numpy(), rois.tolist(), *out_hw, scale, sampling_ratio, aligned)
    k, c = rois.shape[0], features.shape[1]
    return torch.from_numpy(np.asarray(out).reshape(k, *out_hw, c)).permute(0, 3, 1, 2)


def reference_torch(features: torch.Tensor, rois: torch.Tensor, out_hw, scale, sampling_ratio, aligned):
    """Differentiable (through autograd on the loop) version of the reference."""
    out = reference_roi_align(features, rois.tolist(), *out_hw, scale, sampling_ratio, aligned)
    stacked = torch.stack([torch.stack(bins) for bins in out])  # [K, oh*ow, C]
    return stacked.reshape(rois.shape[0], *out_hw, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- box generation


def make_rois(rng: np.random.Generator, n_img: int, height: int, width: int, scale: float) -> torch.Tensor:
    """[K, 5] float64 rois in image pixels covering the awkward cases."""
    img_w, img_h = width / scale, height / scale
    px = 1.0 / scale  # one feature-map pixel in image pixels

    def boxes(x1, y1, w, h):
        return np.stack([x1, y1, x1 + w, y1 + h], axis=1)

    u = lambda lo, hi, n=8: rng.uniform(lo, hi, n)  # noqa: E731
    parts = [
        boxes(u(0, img_w), u(0, img_h), u(0.5 * px, img_w / 2), u(0.5 * px, img_h / 2)),  # ordinary
        boxes(u(0, img_w), u(0, img_h), u(0, 0.9), u(0, 0.9)),  # < 1 image px
        boxes(u(0, img_w), u(0, img_h), u(0, 0.9 * px), u(0, 0.9 * px)),  # < 1 feature px
        boxes(u(0, img_w), u(0, img_h), -u(0, 3 * px), -u(0, 3 * px)),  # x2 < x1, y2 < y1
        boxes(u(-img_w / 2, 0), u(-img_h / 2, 0), u(img_w, 1.5 * img_w), u(img_h, 1.5 * img_h)),  # over all sides
        boxes(u(-px, img_w), u(-px, img_h), u(0.5 * px, img_w), u(0.5 * px, img_h)),  # partly outside
        boxes(u(img_w + 1.5 * px, 2 * img_w, 4), u(0, img_h, 4), u(0, 2 * px, 4), u(0, 2 * px, 4)),  # right
        boxes(u(0, img_w, 4), -u(3 * px, 5 * px, 4), u(0, 2 * px, 4), u(0, 1.5 * px, 4)),  # above
    ]
    # Borders and integer feature-map coordinates (sample points then hit the clamp branches).
    edges = np.array([0.0, img_w, img_h, px, img_w - px, img_h - px, 2 * px, -px])
    corner = rng.choice(edges, size=(8, 4))
    parts.append(corner)
    xyxy = np.concatenate(parts)
    batch = rng.integers(0, n_img, size=(len(xyxy), 1)).astype(np.float64)
    return torch.from_numpy(np.concatenate([batch, xyxy], axis=1))


def to_list(rois: torch.Tensor, n_img: int) -> list[torch.Tensor]:
    return [rois[rois[:, 0] == i, 1:] for i in range(n_img)]


def sorted_by_batch(rois: torch.Tensor) -> torch.Tensor:
    return rois[torch.argsort(rois[:, 0], stable=True)]


# --------------------------------------------------------------------------- 1. hand-computed values

# f[y, x] = 4y + x on a 4x4 map. Bilinear interpolation of a linear function is exact, so a valid
# sample at (y, x) is 4y + x after the kernel's clamps: y, x < 0 -> 0; y >= 3 (= H-1) -> 3.
# Each case: box (x1, y1, x2, y2), output size, scale, sampling_ratio, aligned, expected output.
HAND_CASES = [
    # roi 0..2, bin 2, samples 0.5, 1.5 on both axes: 4*1 + 1
    ((0, 0, 2, 2), 1, 1.0, 2, False, [[4 * 1.0 + 1.0]]),
    # aligned: start -0.5, samples 0, 1: 4*0.5 + 0.5
    ((0, 0, 2, 2), 1, 1.0, 2, True, [[4 * 0.5 + 0.5]]),
    # 2x2 bins of 1 px, one sample each at y in {0.5, 1.5}, x in {1.5, 2.5}
    ((1, 0, 3, 2), (2, 2), 1.0, 1, False, [[4 * 0.5 + 1.5, 4 * 0.5 + 2.5], [4 * 1.5 + 1.5, 4 * 1.5 + 2.5]]),
    # samples 2.5, 3.5; 3.5 has y_low = 3 = H-1 so it is read at 3: mean 2.75 per axis
    ((2, 2, 4, 4), 1, 1.0, 2, False, [[4 * 2.75 + 2.75]]),
    # x samples -3 (< -1: zero) and -1 (clamped to 0); y samples 0.5, 1.5; sum over 4 samples / 4
    ((-4, 0, 0, 2), 1, 1.0, 2, False, [[((4 * 0.5 + 0) + (4 * 1.5 + 0)) / 4]]),
    # adaptive: roi_w 3 -> 3 samples (0.5, 1.5, 2.5), roi_h 1 -> 1 sample (0.5)
    ((0, 0, 3, 1), 1, 1.0, -1, False, [[4 * 0.5 + 1.5]]),
    # tiny unaligned box is forced to 1 px: one sample at 1.5
    ((1, 1, 1.2, 1.2), 1, 1.0, -1, False, [[4 * 1.5 + 1.5]]),
    # tiny aligned box: start 0.5, size 0.2, ceil(0.2) = 1 sample at 0.6
    ((1, 1, 1.2, 1.2), 1, 1.0, -1, True, [[4 * 0.6 + 0.6]]),
    # inverted aligned box, adaptive: ceil(-1) samples -> none -> 0
    ((2, 2, 1, 1), 1, 1.0, -1, True, [[0.0]]),
    # inverted aligned box, fixed: start 1.5, bin -1, sample at 1.5 - 0.5 = 1
    ((2, 2, 1, 1), 1, 1.0, 1, True, [[4 * 1.0 + 1.0]]),
    # inverted unaligned box is forced to 1 px: sample at 2.5
    ((2, 2, 1, 1), 1, 1.0, 1, False, [[4 * 2.5 + 2.5]]),
    # fully outside: samples 5.5, 6.5 > 4
    ((5, 5, 7, 7), 1, 1.0, 2, False, [[0.0]]),
    # y samples 3.5 (read at 3) and 4.5 (> H: zero); x samples 0.25, 0.75
    ((0, 3, 1, 5), 1, 1.0, 2, False, [[((4 * 3 + 0.25) + (4 * 3 + 0.75)) / 4]]),
    # spatial_scale 0.5 maps (0, 0, 4, 4) to the first case
    ((0, 0, 4, 4), 1, 0.5, 2, False, [[4 * 1.0 + 1.0]]),
]


@pytest.mark.parametrize("box, size, scale, ratio, aligned, expected", HAND_CASES)
def test_hand_computed_linear_map(box, size, scale, ratio, aligned, expected):
    features = torch.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    features = torch.cat([features, 2 * features], dim=1)  # channel 1 = 2 * channel 0
    rois = torch.tensor([[0.0, *box]], dtype=F64)
    out = roi_align(features, rois, size, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
    want = torch.tensor(expected, dtype=F64)
    torch.testing.assert_close(out[0, 0], want, atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0, 1], 2 * want, atol=1e-12, rtol=0)


def test_hand_computed_delta_map():
    # One hot pixel at (y=1, x=2): a sample at (y, x) reads tent(y - 1) * tent(x - 2), tent(d) = max(0, 1 - |d|).
    features = torch.zeros(1, 1, 3, 4, dtype=F64)
    features[0, 0, 1, 2] = 1.0
    rois = torch.tensor([[0.0, 2.0, 1.0, 3.0, 1.5]], dtype=F64)
    # unaligned, 1 sample: roi_h 0.5 forced to 1 -> y = 1.5, x = 2.5
    out = roi_align(features, rois, 1, sampling_ratio=1)
    assert out.item() == pytest.approx(0.5 * 0.5, abs=1e-12)
    # aligned, 2x2 samples: x = 1.75, 2.25 (tent 0.75 each); y = 0.625, 0.875 (tent 0.625, 0.875)
    out = roi_align(features, rois, 1, sampling_ratio=2, aligned=True)
    assert out.item() == pytest.approx((0.75 + 0.75) * (0.625 + 0.875) / 4, abs=1e-12)


# --------------------------------------------------------------------------- 2. scalar reference


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 16])
def test_matches_scalar_reference(scale, ratio, aligned):
    rng = np.random.default_rng(1000 + int(1 / scale) * 10 + ratio + 5 * aligned)
    n_img, height, width, out_hw = 3, 6, 9, (3, 2)
    features = torch.from_numpy(rng.standard_normal((n_img, 3, height, width)))
    rois = make_rois(rng, n_img, height, width, scale)
    want = reference_numpy(features, rois, out_hw, scale, ratio, aligned)

    out = roi_align(features, rois, out_hw, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
    assert out.shape == (rois.shape[0], 3, *out_hw) and out.dtype == F64
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)

    # list-of-boxes input gives the rows grouped by image
    out_list = roi_align(features, to_list(rois, n_img), out_hw, scale, ratio, aligned)
    want_list = reference_numpy(features, sorted_by_batch(rois), out_hw, scale, ratio, aligned)
    torch.testing.assert_close(out_list, want_list, atol=1e-10, rtol=0)


@pytest.mark.parametrize("size", [1, 4, (1, 5), (4, 1)])
def test_matches_reference_other_output_sizes(size):
    rng = np.random.default_rng(7)
    features = torch.from_numpy(rng.standard_normal((2, 2, 5, 7)))
    rois = make_rois(rng, 2, 5, 7, 0.25)
    out_hw = (size, size) if isinstance(size, int) else size
    for ratio, aligned in [(-1, False), (3, True)]:
        want = reference_numpy(features, rois, out_hw, 0.25, ratio, aligned)
        out = roi_align(features, rois, size, spatial_scale=0.25, sampling_ratio=ratio, aligned=aligned)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_each_roi_independent_of_batch():
    # Adaptive grids differ per RoI; padding up to the batch maximum must not leak between RoIs.
    rng = np.random.default_rng(3)
    features = torch.from_numpy(rng.standard_normal((2, 2, 8, 8)))
    rois = make_rois(rng, 2, 8, 8, 0.5)
    batched = roi_align(features, rois, (2, 3), 0.5, -1, True)
    single = torch.cat([roi_align(features, rois[k : k + 1], (2, 3), 0.5, -1, True) for k in range(len(rois))])
    torch.testing.assert_close(batched, single, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ratio", [-1, 2])
def test_non_finite_boxes_give_zeros(ratio):
    features = torch.randn(1, 2, 4, 4, dtype=F64)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor(
        [[0, nan, 0, 2, 2], [0, 0, 0, inf, 2], [0, -inf, 0, 2, 2], [0, 0.3, 0.2, 2.7, 3.1]], dtype=F64
    )
    out = roi_align(features, rois, 2, sampling_ratio=ratio)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    torch.testing.assert_close(out[3:], roi_align(features, rois[3:], 2, sampling_ratio=ratio), atol=0, rtol=0)


# --------------------------------------------------------------------------- 3. backward


def _grad_rois(rng, n_img, height, width, scale):
    """Random boxes with generic (non-integer) coordinates, some partly outside."""
    k = 7
    x1 = rng.uniform(-1.3, width - 1, k) / scale
    y1 = rng.uniform(-1.3, height - 1, k) / scale
    w = rng.uniform(0.3, width * 0.8, k) / scale
    h = rng.uniform(0.3, height * 0.8, k) / scale
    batch = rng.integers(0, n_img, k)
    return torch.from_numpy(np.stack([batch, x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64))


@pytest.mark.parametrize("ratio, aligned", [(-1, False), (-1, True), (2, False), (1, True)])
def test_gradcheck(ratio, aligned):
    rng = np.random.default_rng(11 + ratio)
    features = torch.from_numpy(rng.standard_normal((2, 2, 5, 6))).requires_grad_(True)
    rois = _grad_rois(rng, 2, 5, 6, 0.5)
    fn = lambda f: roi_align(f, rois, (2, 3), 0.5, ratio, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (features,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("ratio, aligned", [(-1, False), (0, True), (2, True), (3, False)])
def test_gradient_matches_reference(ratio, aligned):
    rng = np.random.default_rng(21 + ratio)
    base = torch.from_numpy(rng.standard_normal((2, 3, 5, 6)))
    rois = torch.cat([_grad_rois(rng, 2, 5, 6, 1.0), make_rois(rng, 2, 5, 6, 1.0)[::6]])
    upstream = torch.from_numpy(rng.standard_normal((rois.shape[0], 3, 2, 3)))

    features = base.clone().requires_grad_(True)
    (roi_align(features, rois, (2, 3), 1.0, ratio, aligned) * upstream).sum().backward()
    ref_features = base.clone().requires_grad_(True)
    (reference_torch(ref_features, rois, (2, 3), 1.0, ratio, aligned) * upstream).sum().backward()
    assert features.grad.abs().sum() > 0
    torch.testing.assert_close(features.grad, ref_features.grad, atol=1e-10, rtol=0)


def test_no_gradient_to_rois():
    features = torch.randn(1, 2, 4, 4, dtype=F64, requires_grad=True)
    rois = torch.tensor([[0.0, 0.3, 0.2, 2.7, 3.1]], dtype=F64, requires_grad=True)
    roi_align(features, rois, 2).sum().backward()
    assert rois.grad is None and features.grad is not None
    assert not roi_align(features.detach(), rois, 2).requires_grad


# --------------------------------------------------------------------------- 4. edge cases, API


@pytest.mark.parametrize(
    "rois", [torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)], []], ids=["tensor", "list", "empty-list"]
)
def test_empty_rois(rois):
    features = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = roi_align(features, rois, (2, 3), sampling_ratio=-1)
    assert out.shape == (0, 3, 2, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert features.grad is not None and not features.grad.any()


@pytest.mark.parametrize(
    "features, rois, size, match",
    [
        (torch.zeros(3, 4, 4), torch.zeros(1, 5), 2, "features"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 5), 2, "floating"),
        (torch.zeros(1, 3, 0, 4), torch.zeros(1, 5), 2, "spatial"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4), 2, r"\[K, 5\]"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(5), 2, r"\[K, 5\]"),
        (torch.zeros(1, 3, 4, 4), [torch.zeros(2, 5)], 2, r"\[K_i, 4\]"),
        (torch.zeros(1, 3, 4, 4), [torch.zeros(1, 4), torch.zeros(1, 4)], 2, "1 images"),
        (torch.zeros(1, 3, 4, 4), "boxes", 2, "rois"),
        (torch.zeros(2, 3, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2, "batch indices"),
        (torch.zeros(2, 3, 4, 4), torch.tensor([[0.0, 0, 0, 1, 1], [-1.0, 0, 0, 1, 1]]), 2, "batch indices"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 0, "positive"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), (2, 0), "positive"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), (2, 2, 2), "pair"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2.5, "pair"),
    ],
)
def test_validation_errors(features, rois, size, match):
    with pytest.raises(ValueError, match=match):
        roi_align(features, rois, size)


def test_module_wrapper():
    module = RoIAlign((2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert "output_size=(2, 3)" in repr(module) and "aligned=True" in repr(module)
    assert list(module.parameters()) == []
    rng = np.random.default_rng(5)
    features = torch.from_numpy(rng.standard_normal((2, 3, 6, 6)))
    rois = make_rois(rng, 2, 6, 6, 0.5)
    torch.testing.assert_close(module(features, rois), roi_align(features, rois, (2, 3), 0.5, 2, True))
    assert RoIAlign(4)(features, rois).shape == (rois.shape[0], 3, 4, 4)
    with pytest.raises(ValueError):
        RoIAlign((0, 2))


@pytest.mark.parametrize("ratio, aligned", [(-1, False), (2, True)])
def test_float32_matches_float64(ratio, aligned):
    rng = np.random.default_rng(9)
    features = torch.from_numpy(rng.standard_normal((2, 4, 7, 8)))
    rois = _grad_rois(rng, 2, 7, 8, 0.25)
    out64 = roi_align(features, rois, (3, 2), 0.25, ratio, aligned)
    out32 = roi_align(features.float(), rois.float(), (3, 2), 0.25, ratio, aligned)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, atol=1e-5, rtol=0)
    # rois in another dtype than the features are converted
    torch.testing.assert_close(roi_align(features.float(), rois, (3, 2), 0.25, ratio, aligned), out32)
