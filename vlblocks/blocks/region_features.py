"""Where region appearance features come from: a precomputed file, or pixels through a CNN."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.ops.roi_align import roi_align


class PrecomputedRegionFeatures(nn.Module):
    """Passes the batch's precomputed region features through (e.g. bottom-up-attention pool5).

    Args:
        feature_size: expected feature size D (checked).

    Inputs: batch with `region_features` [B, N, D]. Returns: [B, N, D].
    """

    def __init__(self, feature_size: int = 2048) -> None:
        super().__init__()
        self.out_features = feature_size

    def forward(self, batch: VLBatch) -> Tensor:
        if batch.region_features is None:
            raise ValueError("this model reads precomputed region features, but the batch has none (region_features is None)")
        if batch.region_features.shape[-1] != self.out_features:
            raise ValueError(
                f"region features have size {batch.region_features.shape[-1]}, the recipe expects {self.out_features}"
            )
        return batch.region_features


def valid_regions(batch: VLBatch) -> tuple[Tensor, Tensor]:
    """[K] image and [K] region index of every valid region, in row-major order: the batch's
    host-made `image_region_slots` when it has them (nothing waits for the device), else found
    from `region_mask`."""
    slots = batch.image_region_slots if batch.image_region_slots is not None else batch.region_mask.bool().nonzero()
    return slots[:, 0], slots[:, 1]


class EndToEndRegionFeatures(nn.Module):
    """Image → backbone feature map → RoIAlign per box → RoI head → one vector per region.

    For VL-BERT: ResNet-101 C4 (stride 16), RoIAlign 14x14 with sampling ratio 1 and
    aligned=False, then the dilated C5 head and average pooling (2048-d).

    Args:
        backbone: module with `stride` and `out_channels`, mapping [B, 3, H, W] images to a
            [B, C, H', W'] map.
        roi_head: module with `out_channels`, mapping [K, C, S, S] RoI grids to [K, D].
        output_size: RoIAlign grid S.
        sampling_ratio: RoIAlign samples per bin and axis (<= 0: adaptive).
        aligned: RoIAlign's half-pixel offset.
        spatial_scale: feature-map scale; default 1 / backbone.stride.
        backbone_checkpoint: a local ResNet file (the official `resnet101-pt-vgbua-0000.model`, a
            torchvision `resnet101-*.pth` or a detectron `R-101.pkl`) whose stem and layer1-3 start
            the backbone and whose layer4 starts the RoI head. The block only records the path:
            the run loads it after building (`vlblocks.interop.resnet_weights`), before a
            `experiment.pretrained` checkpoint, which overrides it.
        random_backbone: train a ResNet backbone / C5 head from random weights on purpose. A
            training run refuses to start them randomly otherwise (no backbone_checkpoint, no
            pre-trained checkpoint, no resume), except on the embedded demo data.

    Inputs: batch with `images` [B, 3, H, W], `boxes` [B, N, 4] in those pixels, `region_mask` [B, N],
        optional `region_masks` [B, N, M, M]: instance masks multiplied into the RoI head's
        feature map before its pooling (VL-BERT's VCR), resampled to the map's size when M differs.

    Returns: [B, N, D] features, zeros at padded regions.
    """

    def __init__(
        self,
        backbone: nn.Module,
        roi_head: nn.Module,
        output_size: int = 14,
        sampling_ratio: int = 1,
        aligned: bool = False,
        spatial_scale: Optional[float] = None,
        backbone_checkpoint: Optional[str] = None,
        random_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.roi_head = roi_head
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.spatial_scale = spatial_scale if spatial_scale is not None else 1.0 / backbone.stride
        self.out_features: int = roi_head.out_channels
        self.backbone_checkpoint = backbone_checkpoint
        self.random_backbone = random_backbone

    def roi_grids(self, batch: VLBatch) -> Tensor:
        """[K, C, S, S] RoIAlign grids of the K valid regions, in row-major (image, region) order."""
        if batch.images is None:
            raise ValueError("this model computes region features from pixels, but the batch has no images")
        feature_map = self.backbone(batch.with_normalized_images().images)
        image, region = valid_regions(batch)
        rois = torch.cat([image[:, None].to(feature_map.dtype), batch.boxes[image, region].to(feature_map.dtype)], 1)
        return roi_align(feature_map, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, validate=False)

    def forward(self, batch: VLBatch) -> Tensor:
        grids = self.roi_grids(batch)
        image, region = valid_regions(batch)
        if batch.region_masks is None:
            pooled = self.roi_head(grids)
        else:  # VCR: the head's map is multiplied by each region's instance mask before pooling
            feature_map = self.roi_head.feature_map(grids)
            masks = F.adaptive_avg_pool2d(batch.region_masks[image, region][:, None].to(feature_map.dtype), feature_map.shape[-2:])
            pooled = self.roi_head.pool(feature_map * masks)
        features = pooled.new_zeros(*batch.region_mask.shape, pooled.shape[-1])
        return features.index_put((image, region), pooled)
