"""Visual backbones and RoI heads for the end-to-end visual front end.

VL-BERT's front end is: image -> :class:`ResNetC4Backbone` (ResNet conv1..layer3,
stride 16) -> RoIAlign (14x14, spatial scale 1/16) -> :class:`DilatedC5RoIHead`
(layer4 with stride 1 and dilation 2, then mean pooling) -> one 2048-d vector per RoI.

The ResNet is caffe-style (``stride_in_1x1=True``: a block's stride sits on its first
1x1 conv) because the official weights were converted from caffe (bottom-up-attention).
Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so those checkpoints load by name; the head's blocks are
named ``0``, ``1``, ``2`` (torchvision's ``layer4.*`` with the prefix stripped).

:class:`TinyBackbone` and :class:`PooledRoIHead` are small, fast stand-ins with the same
interface (``out_channels``, ``stride``, ``forward``, ``feature_map``) for demos and tests.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Bottleneck",
    "ResNetC4Backbone",
    "DilatedC5RoIHead",
    "TinyBackbone",
    "IdentityBackbone",
    "PooledRoIHead",
    "FlattenRoIHead",
]

_STAGE_BLOCKS = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 -> 3x3 -> 1x1 convs (no bias) with BatchNorm and a residual.

    Args:
        in_channels: channels of the input.
        mid_channels: channels of the inner 1x1/3x3 convs.
        out_channels: channels of the output (4 * mid_channels in a standard ResNet).
        stride: spatial stride of the block.
        dilation: dilation (and padding) of the 3x3 conv.
        stride_in_1x1: put the stride on ``conv1`` (caffe / MSRA style) instead of ``conv2``
            (torchvision style).

    Inputs:
        x: ``[B, in_channels, H, W]``.

    Returns:
        ``[B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=stride_3x3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


def _make_stage(
    in_channels: int,
    mid_channels: int,
    num_blocks: int,
    stride: int,
    dilation: int,
    stride_in_1x1: bool,
) -> nn.Sequential:
    """``num_blocks`` bottlenecks; only the first one strides / changes the channel count."""
    out_channels = 4 * mid_channels
    blocks = [Bottleneck(in_channels, mid_channels, out_channels, stride, dilation, stride_in_1x1)]
    blocks += [
        Bottleneck(out_channels, mid_channels, out_channels, 1, dilation, stride_in_1x1)
        for _ in range(num_blocks - 1)
    ]
    return nn.Sequential(*blocks)


def _init_resnet(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class ResNetC4Backbone(nn.Module):
    """ResNet conv1..layer3 ("C4"), total stride 16.

    For the official (caffe-converted) weights the input must follow the caffe convention:
    BGR channel order, 0-255 pixel range, per-channel mean subtracted, no std division.
    That preprocessing is the caller's job.

    Args:
        depth: ResNet depth, selecting the blocks per stage (50 -> [3, 4, 6], 101 -> [3, 4, 23],
            152 -> [3, 8, 36]); ignored when ``stage_blocks`` is given.
        base_width: stem width; stage ``i`` (1..3) has inner width ``base_width * 2**(i-1)`` and
            output width 4x that. 64 gives the standard ResNet.
        stage_blocks: explicit blocks for layer1..layer3 (e.g. ``[1, 1, 1]`` for a tiny test net).
        stride_in_1x1: caffe-style stride on each block's first 1x1 conv (True for official weights).
        freeze_at: freeze the stem (1) and layer1..layer{freeze_at - 1}; 0 freezes nothing,
            2 (the reference) freezes the stem and layer1. Frozen parts get ``requires_grad=False``
            and stay in eval mode.
        freeze_batchnorm: freeze every BatchNorm (no gradient to its affine parameters, running
            statistics never updated, eval mode even after ``.train()``).

    Inputs:
        images: ``[B, 3, H, W]``.

    Returns:
        ``[B, out_channels, ceil(H / 16), ceil(W / 16)]``.

    Attributes:
        out_channels: ``16 * base_width`` (1024 for the standard ResNet).
        stride: 16.
        stride_in_1x1: as given.

    The weights start random (Kaiming convs, BatchNorm 1 / 0, statistics 0 / 1); a run starts
    them from a ResNet file through ``EndToEndRegionFeatures.backbone_checkpoint``
    (``vlblocks.interop.resnet_weights``).
    """

    def __init__(
        self,
        depth: int = 101,
        base_width: int = 64,
        stage_blocks: Sequence[int] | None = None,
        stride_in_1x1: bool = True,
        freeze_at: int = 2,
        freeze_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if stage_blocks is None:
            if depth not in _STAGE_BLOCKS:
                raise ValueError(f"unsupported depth {depth}; expected one of {sorted(_STAGE_BLOCKS)}")
            stage_blocks = _STAGE_BLOCKS[depth]
        if len(stage_blocks) != 3:
            raise ValueError(f"stage_blocks must have 3 entries (layer1..layer3), got {list(stage_blocks)}")
        if not 0 <= freeze_at <= 4:
            raise ValueError(f"freeze_at must be in [0, 4], got {freeze_at}")

        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        in_channels = base_width
        for i, num_blocks in enumerate(stage_blocks):
            mid = base_width * 2**i
            stride = 1 if i == 0 else 2  # layer1 follows the max-pool, so it keeps resolution
            self.add_module(f"layer{i + 1}", _make_stage(in_channels, mid, num_blocks, stride, 1, stride_in_1x1))
            in_channels = 4 * mid
        self.out_channels = in_channels
        self.stride = 16
        self.stride_in_1x1 = stride_in_1x1  # checked against a weights file's layout when one is loaded
        self.freeze_at = freeze_at
        self.freeze_batchnorm = freeze_batchnorm

        _init_resnet(self)
        for module in self._frozen_modules():
            _freeze(module)
        if freeze_batchnorm:
            for bn in _batchnorms(self):
                _freeze(bn)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_at == 0:
            return []
        # freeze_at=1 -> stem (conv1, bn1); freeze_at=k>1 -> stem + layer1..layer{k-1}.
        parts: list[nn.Module] = [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]
        return parts[: self.freeze_at + 1]

    def train(self, mode: bool = True) -> "ResNetC4Backbone":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        if self.freeze_batchnorm:
            for bn in _batchnorms(self):
                bn.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.layer3(self.layer2(self.layer1(x)))


class DilatedC5RoIHead(nn.Sequential):
    """ResNet layer4 with stride 1 and dilation 2 on the 3x3 convs, then mean over the RoI grid.

    Keeping stride 1 preserves the 14x14 RoIAlign grid; dilation 2 keeps the receptive field of
    the original stride-2 layer4. State-dict keys are the blocks of torchvision's ``layer4``
    without the prefix (``0.conv1.weight``, ``0.downsample.0.weight``, ``2.bn3.running_var``...).

    Args:
        in_channels: channels of the RoI features (1024 for ResNet C4).
        base_width: backbone stem width; the inner width is ``8 * base_width`` and the output
            ``32 * base_width`` (2048 for the standard ResNet).
        num_blocks: bottleneck blocks (3 in every standard ResNet).
        stride_in_1x1: caffe-style stride placement (irrelevant at stride 1, kept for symmetry).
        dilation: dilation and padding of every block's 3x3 conv.
        freeze_batchnorm: freeze every BatchNorm (no gradient, eval mode even after ``.train()``).
        frozen: freeze the whole head (no gradient to any parameter): with ``freeze_at=4`` on
            the backbone, the detector is not tuned (the paper's ablation).

    Inputs:
        roi_features: ``[K, in_channels, S, S]`` RoIAlign output.

    Returns:
        ``[K, out_channels]`` (``feature_map`` gives ``[K, out_channels, S, S]`` before pooling).
    """

    def __init__(
        self,
        in_channels: int = 1024,
        base_width: int = 64,
        num_blocks: int = 3,
        stride_in_1x1: bool = True,
        dilation: int = 2,
        freeze_batchnorm: bool = True,
        frozen: bool = False,
    ) -> None:
        super().__init__(*_make_stage(in_channels, 8 * base_width, num_blocks, 1, dilation, stride_in_1x1))
        self.out_channels = 32 * base_width
        self.freeze_batchnorm = freeze_batchnorm
        _init_resnet(self)
        if frozen:
            _freeze(self)
        if freeze_batchnorm:
            for bn in _batchnorms(self):
                _freeze(bn)
        self.train(self.training)

    def train(self, mode: bool = True) -> "DilatedC5RoIHead":
        super().train(mode)
        if self.freeze_batchnorm:
            for bn in _batchnorms(self):
                bn.eval()
        return self

    def feature_map(self, roi_features: Tensor) -> Tensor:
        """``[K, in_channels, S, S]`` -> ``[K, out_channels, S, S]`` (layer4, no pooling)."""
        return super().forward(roi_features)

    def pool(self, feature_map: Tensor) -> Tensor:
        """``[K, out_channels, S, S]`` -> ``[K, out_channels]``: the mean over the grid."""
        return feature_map.mean(dim=(2, 3))

    def forward(self, roi_features: Tensor) -> Tensor:
        return self.pool(self.feature_map(roi_features))


class TinyBackbone(nn.Module):
    """A small, fast conv net with the backbone interface, for demos and tests.

    ``log2(stride)`` 3x3 stride-2 conv+ReLU layers (a single stride-1 one when ``stride == 1``),
    then a 3x3 conv+ReLU to ``out_channels``. No normalisation.

    Args:
        out_channels: channels of the output map.
        stride: total stride, a power of two.
        width: channels of the hidden layers.

    Inputs:
        images: ``[B, 3, H, W]``.

    Returns:
        ``[B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, out_channels: int = 64, stride: int = 8, width: int = 32) -> None:
        super().__init__()
        if stride < 1 or stride & (stride - 1):
            raise ValueError(f"stride must be a power of two, got {stride}")
        num_down = int(math.log2(stride))
        layers: list[nn.Module] = []
        in_channels = 3
        for _ in range(max(num_down, 1)):
            layers += [nn.Conv2d(in_channels, width, 3, stride=2 if num_down else 1, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class PooledRoIHead(nn.Module):
    """RoI head for small backbones: optional 1x1 conv+ReLU, then mean over the RoI grid.

    Args:
        in_channels: channels of the RoI features.
        out_channels: output channels; ``None`` means no projection (identity, then pooling).

    Inputs:
        roi_features: ``[K, in_channels, S, S]``.

    Returns:
        ``[K, out_channels]`` (``feature_map`` gives ``[K, out_channels, S, S]`` before pooling).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.proj: nn.Module = (
            nn.Identity()
            if out_channels is None
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        )
        self.out_channels = in_channels if out_channels is None else out_channels

    def feature_map(self, roi_features: Tensor) -> Tensor:
        """``[K, in_channels, S, S]`` -> ``[K, out_channels, S, S]``."""
        return self.proj(roi_features)

    def pool(self, feature_map: Tensor) -> Tensor:
        """``[K, out_channels, S, S]`` -> ``[K, out_channels]``: the mean over the grid."""
        return feature_map.mean(dim=(2, 3))

    def forward(self, roi_features: Tensor) -> Tensor:
        return self.pool(self.feature_map(roi_features))


class IdentityBackbone(nn.Module):
    """No CNN: the "feature map" is the normalised image itself (stride 1, 3 channels).

    With RoIAlign and `FlattenRoIHead` this gives each region its resampled pixels: the
    cheapest honest visual front end for small synthetic scenes.

    Inputs: images ``[B, 3, H, W]``. Returns: the same tensor.
    """

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.out_channels = channels
        self.stride = 1

    def forward(self, images: Tensor) -> Tensor:
        return images


class FlattenRoIHead(nn.Module):
    """RoI head that keeps the layout: flatten the ``S x S`` grid, then Linear + ReLU.

    Mean pooling would keep a region's colour but lose its shape; flattening keeps both.

    Args:
        in_channels: channels C of the RoI grid.
        output_size: the RoI grid size S.
        out_channels: output size.

    Inputs:
        roi_features: ``[K, C, S, S]``.

    Returns:
        ``[K, out_channels]`` (``feature_map`` is the grid itself, ``pool`` the projection).
    """

    def __init__(self, in_channels: int = 3, output_size: int = 7, out_channels: int = 128) -> None:
        super().__init__()
        self.projection = nn.Linear(in_channels * output_size * output_size, out_channels)
        self.out_channels = out_channels

    def feature_map(self, roi_features: Tensor) -> Tensor:
        return roi_features

    def pool(self, feature_map: Tensor) -> Tensor:
        """``[K, C, S, S]`` -> ``[K, out_channels]``: flatten, Linear, ReLU."""
        return F.relu(self.projection(feature_map.flatten(1)))

    def forward(self, roi_features: Tensor) -> Tensor:
        return self.pool(roi_features)
