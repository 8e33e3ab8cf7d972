"""Masked RoI classification with linguistic clues (VL-BERT's MVRC)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.objectives.objective import PretrainingObjective
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


class RegionMasking(PretrainingObjective):
    """Choose regions (never the whole-image box, region 0) with `probability`; of those,
    `mask_fraction` are masked and the rest kept. A masked region's [IMG] token becomes the
    learned masked-region token, and its appearance is hidden: end to end, its pixels are zeroed
    before the CNN (so the whole-image box does not leak it); with precomputed features, a
    learned mask feature replaces its feature and the whole-image feature is recomputed as the
    mean of the unmasked regions. Every chosen region is scored against the detector's soft
    class distribution with soft cross-entropy (`MaskedRegionClassification`); alone, this
    masking has no loss and other objectives score the chosen regions (`region_positions`), as
    LXMERT's object, attribute and feature objectives do.

    Args:
        probability, mask_fraction: 0.15 and 0.9 in VL-BERT.
        precomputed_feature_size: D for precomputed features (creates `mask_feature` [1, D],
            initialised to 0); None for end-to-end masking of pixels.
        weight: factor of this loss in the total.
        name: metric prefix.

    `mask(batch, seeds)` runs on the host (CPU tensors), each row drawing from its own
    generator seeded by `seeds[b]`. It needs `region_class_scores` [B, N, C]; it sets
    `masked_regions`, `region_targets`, the [K, 2] `region_positions` it scores (chosen regions
    whose target is a distribution), and `masked_dropped` when the batch carries the boxes that
    truncation dropped: the official code masks over all boxes before truncating, so those draw
    too and, masked, still have their pixels zeroed and leave the whole-image feature.
    `conceal(batch)` hides them on the device: end to end it zeroes their pixels once the images
    are normalised there (they travel as uint8), with precomputed features it puts in the
    learned mask feature. `loss(logits, batch)` takes [K, C] logits at `region_positions`, in
    batch order.
    """

    def __init__(
        self,
        probability: float = 0.15,
        mask_fraction: float = 0.9,
        precomputed_feature_size: Optional[int] = None,
        weight: float = 1.0,
        name: str = "region_masking",
    ) -> None:
        super().__init__()
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.weight = weight
        self.name = name
        self.mask_feature = (
            nn.Parameter(torch.zeros(1, precomputed_feature_size)) if precomputed_feature_size is not None else None
        )

    def positions(self, batch: VLBatch) -> Optional[Tensor]:
        return batch.region_positions

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        if batch.region_class_scores is None:
            raise ValueError("region masking needs batch.region_class_scores (the detector's distributions)")
        if self.mask_feature is None and batch.images is None:
            raise ValueError("end-to-end region masking needs batch.images; set precomputed_feature_size for features")
        draws, dropped_draws = self.region_draws(batch, seeds)
        candidates = batch.region_mask.bool().clone()
        candidates[:, 0] = False
        chosen = candidates & (draws[..., 0] < self.probability)
        masked = chosen & (draws[..., 1] < self.mask_fraction)
        targets = batch.region_class_scores * chosen.unsqueeze(-1).to(batch.region_class_scores.dtype)
        scored = chosen & ((targets.sum(-1) - 1).abs() <= 0.1)  # a chosen region whose target is a distribution
        changes = dict(masked_regions=masked, region_targets=targets, region_positions=scored.nonzero())
        if batch.dropped_box_mask is not None:
            changes["masked_dropped"] = batch.dropped_box_mask.bool() & (dropped_draws[..., 0] < self.probability) & (
                dropped_draws[..., 1] < self.mask_fraction
            )
        return batch.replace(**changes)

    def region_draws(self, batch: VLBatch, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's two uniform draws per region: [B, N, 2] for its regions, then [B, M, 2] for
        the boxes truncation dropped (`dropped_box_mask`; M = 0 without it), all from one
        stream in box order, so a box's draws do not depend on where the budget cut (1 at padding)."""
        counts = batch.region_mask.sum(1).tolist()
        dropped_mask = batch.dropped_box_mask if batch.dropped_box_mask is not None else batch.region_mask.new_zeros(batch.batch_size, 0)
        dropped_counts = dropped_mask.sum(1).tolist()
        draws = torch.ones(*batch.region_mask.shape, 2)
        dropped_draws = torch.ones(*dropped_mask.shape, 2)
        for row, generator in enumerate(row_generators(seeds, REGION_SALT)):
            row_draws = torch.rand(counts[row] + dropped_counts[row], 2, generator=generator)
            draws[row, : counts[row]] = row_draws[: counts[row]]
            dropped_draws[row, : dropped_counts[row]] = row_draws[counts[row] :]
        return draws, dropped_draws

    def conceal(self, batch: VLBatch) -> VLBatch:
        """On the device, what the model must not see of the masked regions: end to end, their
        pixels zeroed (the mean colour) after the images are normalised, a masked box that
        truncation dropped included (the official code zeroes before it truncates); precomputed,
        their features replaced by the learned mask feature."""
        if batch.masked_regions is None:
            return batch
        if self.mask_feature is None:
            batch = batch.with_normalized_images()
            boxes, masked = batch.boxes, batch.masked_regions
            if batch.masked_dropped is not None:
                boxes = torch.cat([boxes, batch.dropped_boxes.to(boxes.dtype)], dim=1)
                masked = torch.cat([masked, batch.masked_dropped], dim=1)
            return batch.replace(images=zero_region_pixels(batch.images, boxes, masked))
        return batch.replace(region_features=self.hide_features(batch, batch.masked_regions))

    def hide_features(self, batch: VLBatch, masked: Tensor) -> Tensor:
        """Masked regions get the learned mask feature; region 0 (the mean of all n of the
        file's boxes) is recomputed without the masked ones, those that truncation dropped
        included: (n * mean - sum(masked)) / (n - n_masked + 1e-5), as the official dataset does.

        Inputs: batch.region_features [B, N, D] (with `dropped_features` [B, M, D],
        `dropped_box_mask` and `masked_dropped` [B, M] when boxes were dropped); masked [B, N] bool.
        Returns: [B, N, D].
        """
        features = batch.region_features
        if features is None:
            raise ValueError("precomputed region masking needs batch.region_features")
        weights = masked.unsqueeze(-1).to(features.dtype)
        regions = batch.region_mask.bool().clone()
        regions[:, 0] = False
        count = regions.sum(1, keepdim=True).to(features.dtype)
        masked_count = masked.sum(1, keepdim=True).to(features.dtype)
        masked_sum = (features * weights).sum(1)
        if batch.masked_dropped is not None:
            if batch.dropped_features is None:
                raise ValueError("precomputed region masking of dropped boxes needs batch.dropped_features")
            dropped_weights = batch.masked_dropped.unsqueeze(-1).to(features.dtype)
            count = count + batch.dropped_box_mask.sum(1, keepdim=True).to(features.dtype)
            masked_count = masked_count + batch.masked_dropped.sum(1, keepdim=True).to(features.dtype)
            masked_sum = masked_sum + (batch.dropped_features.to(features.dtype) * dropped_weights).sum(1)
        whole_image = (count * features[:, 0] - masked_sum) / (count - masked_count + 1e-5)
        hidden = features * (1 - weights) + self.mask_feature.to(features.dtype) * weights
        return torch.cat([whole_image.unsqueeze(1), hidden[:, 1:]], dim=1)


class MaskedRegionClassification(RegionMasking):
    """VL-BERT's masked RoI classification: `RegionMasking`, then the model's `region_head` over
    the chosen regions' states, scored against the detector's soft distributions (see
    `RegionMasking` for the arguments)."""

    head = "region_head"
    states = "regions"

    def __init__(
        self,
        probability: float = 0.15,
        mask_fraction: float = 0.9,
        precomputed_feature_size: Optional[int] = None,
        weight: float = 1.0,
        name: str = "mvrc",
    ) -> None:
        super().__init__(probability, mask_fraction, precomputed_feature_size, weight, name)

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
