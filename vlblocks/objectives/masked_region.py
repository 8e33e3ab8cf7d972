"""Masked RoI classification with linguistic clues (VL-BERT's MVRC)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.objectives.output import ObjectiveOutput, nothing_to_score
from vlblocks.seeding import row_generators

REGION_SALT = 2  # this objective's draws for a sample, apart from every other objective's


def zero_region_pixels(images: Tensor, boxes: Tensor, masked: Tensor) -> Tensor:
    """Zero `[int(y1):int(y2)+1, int(x1):int(x2)+1]` of each masked box in the normalised images.

    Inputs: images [B, 3, H, W]; boxes [B, N, 4] in those pixels; masked [B, N] bool.
    Returns: [B, 3, H, W] (a new tensor). Zero is the mean colour after normalisation.
    """
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    corners = boxes.floor().long()
    covered = torch.zeros(images.shape[0], height, width, dtype=torch.bool, device=images.device)
    for region in range(boxes.shape[1]):  # N is small; a [B, N, H, W] mask would not be
        x1, y1, x2, y2 = corners[:, region].unbind(-1)
        inside_rows = (rows >= y1[:, None]) & (rows <= y2[:, None])
        inside_cols = (cols >= x1[:, None]) & (cols <= x2[:, None])
        covered |= masked[:, region, None, None] & inside_rows[:, :, None] & inside_cols[:, None, :]
    return images.masked_fill(covered[:, None], 0.0)


class MaskedRegionClassification(nn.Module):
    """Choose regions (never the whole-image box, region 0) with `probability`; of those,
    `mask_fraction` are masked and the rest kept. A masked region's [IMG] token becomes the
    learned masked-region token, and its appearance is hidden: end to end, its pixels are zeroed
    before the CNN (so the whole-image box does not leak it); with precomputed features, a
    learned mask feature replaces its feature and the whole-image feature is recomputed as the
    mean of the unmasked regions. Every chosen region is scored against the detector's soft
    class distribution with soft cross-entropy.

    Args:
        probability, mask_fraction: 0.15 and 0.9 in VL-BERT.
        precomputed_feature_size: D for precomputed features (creates `mask_feature` [1, D],
            initialised to 0); None for end-to-end masking of pixels.
        weight: factor of this loss in the total.
        name: metric prefix.

    `mask(batch, seeds)` runs on the host (CPU tensors), each row drawing from its own
    generator seeded by `seeds[b]`. It needs `region_class_scores` [B, N, C]; it sets
    `masked_regions`, `region_targets`, the [K, 2] `region_positions` it scores (chosen regions
    whose target is a distribution). `conceal(batch)` hides them on the device: end to end it
    zeroes their pixels once the images are normalised there (they travel as uint8), with
    precomputed features it puts in the learned mask feature. `loss(logits, batch)` takes [K, C] logits at `region_positions`, in batch order.
    """

    def __init__(
        self,
        probability: float = 0.15,
        mask_fraction: float = 0.9,
        precomputed_feature_size: Optional[int] = None,
        weight: float = 1.0,
        name: str = "mvrc",
    ) -> None:
        super().__init__()
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.weight = weight
        self.name = name
        self.mask_feature = (
            nn.Parameter(torch.zeros(1, precomputed_feature_size)) if precomputed_feature_size is not None else None
        )

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        if batch.region_class_scores is None:
            raise ValueError("masked-region classification needs batch.region_class_scores (the detector's distributions)")
        if self.mask_feature is None and batch.images is None:
            raise ValueError("end-to-end region masking needs batch.images; set precomputed_feature_size for features")
        counts = batch.region_mask.sum(1).tolist()
        draws = torch.ones(*batch.region_mask.shape, 2)
        for row, generator in enumerate(row_generators(seeds, REGION_SALT)):
            draws[row, : counts[row]] = torch.rand(counts[row], 2, generator=generator)
        candidates = batch.region_mask.bool().clone()
        candidates[:, 0] = False
        chosen = candidates & (draws[..., 0] < self.probability)
        masked = chosen & (draws[..., 1] < self.mask_fraction)
        targets = batch.region_class_scores * chosen.unsqueeze(-1).to(batch.region_class_scores.dtype)
        scored = chosen & ((targets.sum(-1) - 1).abs() <= 0.1)  # a chosen region whose target is a distribution
        return batch.replace(masked_regions=masked, region_targets=targets, region_positions=scored.nonzero())

    def conceal(self, batch: VLBatch) -> VLBatch:
        """On the device, what the model must not see of the masked regions: end to end, their
        pixels zeroed (the mean colour) after the images are normalised; precomputed, their
        features replaced by the learned mask feature."""
        if batch.masked_regions is None:
            return batch
        if self.mask_feature is None:
            batch = batch.with_normalized_images()
            return batch.replace(images=zero_region_pixels(batch.images, batch.boxes, batch.masked_regions))
        return batch.replace(region_features=self.hide_features(batch, batch.masked_regions))

    def hide_features(self, batch: VLBatch, masked: Tensor) -> Tensor:
        """Masked regions get the learned mask feature; region 0 (the mean of all regions) is
        recomputed without them: (n * mean - sum(masked)) / (n - n_masked + 1e-5)."""
        features = batch.region_features
        if features is None:
            raise ValueError("precomputed region masking needs batch.region_features")
        weights = masked.unsqueeze(-1).to(features.dtype)
        regions = batch.region_mask.bool().clone()
        regions[:, 0] = False
        count = regions.sum(1, keepdim=True).to(features.dtype)
        masked_sum = (features * weights).sum(1)
        whole_image = (count * features[:, 0] - masked_sum) / (count - masked.sum(1, keepdim=True).to(features.dtype) + 1e-5)
        hidden = features * (1 - weights) + self.mask_feature.to(features.dtype) * weights
        return torch.cat([whole_image.unsqueeze(1), hidden[:, 1:]], dim=1)

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        if batch.region_targets.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"the region targets have {batch.region_targets.shape[-1]} classes but the region head predicts "
                f"{logits.shape[-1]}: set MaskedRegionHead.num_classes to the detector's class count"
            )
        positions = batch.region_positions
        count = positions.shape[0]
        if count == 0:
            return nothing_to_score(logits, self.name)
        targets = batch.region_targets[positions[:, 0], positions[:, 1]]
        log_probabilities = torch.log_softmax(logits.float(), dim=-1)
        loss = -(targets * log_probabilities).sum(-1).mean()
        accuracy = (logits.argmax(-1) == targets.argmax(-1)).float().mean()
        return ObjectiveOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/accuracy": accuracy, f"{self.name}/count": float(count)})
