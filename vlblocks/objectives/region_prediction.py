"""LXMERT's region objectives: object labels, attributes and features of the masked regions."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput, nothing_to_score


class _MaskedRegionPrediction(PretrainingObjective):
    """Scores the regions a `RegionMasking` earlier in the list chose (`region_positions`) with
    one output of the model's `visual_head` (`RegionPredictionHead`)."""

    head = "visual_head"
    states = "regions"

    def __init__(self, output: str, weight: float, name: str) -> None:
        super().__init__()
        self.output = output
        self.weight = weight
        self.name = name

    def positions(self, batch: VLBatch) -> Optional[Tensor]:
        if batch.region_positions is None:
            raise ValueError(f"{self.name} scores the masked regions: list a RegionMasking (or MaskedRegionClassification) objective before it")
        return batch.region_positions

    def classification_loss(self, logits: Tensor, labels: Tensor, confidences: Optional[Tensor]) -> ObjectiveOutput:
        """Cross-entropy of [K, C] logits against [K] labels (-1: not scored), each term weighted by
        its [K] confidence when given, averaged over the scored regions."""
        scored = labels >= 0
        count = int(scored.sum())
        if count == 0:
            return nothing_to_score(logits, self.name)
        losses = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
        if confidences is not None:
            losses = losses * confidences.to(losses.dtype)
        loss = (losses * scored).sum() / count
        accuracy = ((logits.argmax(-1) == labels) & scored).sum() / count
        return ObjectiveOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/accuracy": accuracy, f"{self.name}/count": float(count)})


class ObjectLabelClassification(_MaskedRegionPrediction):
    """Predict each masked region's detector label (the class of its largest detector score,
    `region_class_scores`) from its state: cross-entropy weighted by that score when
    `weight_by_confidence` (LXMERT weights by the detector's confidence).

    Args:
        weight: factor of this loss in the total. name: metric prefix.
        output: the `visual_head` output it reads ("object").
        weight_by_confidence: multiply each region's loss by its detector score.

    Inputs: [K, C] logits at `region_positions`; the batch's `region_class_scores` [B, N, C].
    """

    def __init__(self, weight: float = 1.0, name: str = "object", output: str = "object", weight_by_confidence: bool = True) -> None:
        super().__init__(output, weight, name)
        self.weight_by_confidence = weight_by_confidence

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        if batch.region_class_scores is None:
            raise ValueError("object label classification needs batch.region_class_scores (the detector's distributions)")
        positions = batch.region_positions
        scores = batch.region_class_scores[positions[:, 0], positions[:, 1]]
        if scores.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the detector has {scores.shape[-1]} classes but the visual head's {self.output!r} output has {logits.shape[-1]}")
        confidence, labels = scores.max(-1)
        return self.classification_loss(logits, labels, confidence if self.weight_by_confidence else None)


class AttributeClassification(_MaskedRegionPrediction):
    """Predict each masked region's attribute label (`region_attribute_labels`, -1 where the
    data has none) from its state: cross-entropy over the regions that have one.

    Args: weight, name, output ("attribute") as `ObjectLabelClassification`.
    """

    def __init__(self, weight: float = 1.0, name: str = "attribute", output: str = "attribute") -> None:
        super().__init__(output, weight, name)

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        if batch.region_attribute_labels is None:
            raise ValueError("attribute classification needs batch.region_attribute_labels (the data gives none)")
        positions = batch.region_positions
        return self.classification_loss(logits, batch.region_attribute_labels[positions[:, 0], positions[:, 1]], None)


class MaskedFeatureRegression(_MaskedRegionPrediction):
    """Regress each masked region's precomputed appearance feature from its state: smooth L1
    (beta 1) averaged over the feature's dimensions, then over the masked regions.

    The targets are taken on the host by `mask` (after the region masking, before `conceal`
    hides the features): `region_feature_targets` [K, D] at `region_positions`. Precomputed
    features only: end to end there is no fixed feature to regress.

    Args: weight, name, output ("feature") as `ObjectLabelClassification`.
    """

    def __init__(self, weight: float = 1.0, name: str = "feature", output: str = "feature") -> None:
        super().__init__(output, weight, name)

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        if batch.region_features is None:
            raise ValueError("masked feature regression needs precomputed region features (the batch has none: an end-to-end recipe?)")
        if batch.rows_per_image != 1:
            raise ValueError("masked feature regression reads one image per row (rows_per_image = 1)")
        positions = self.positions(batch)
        return batch.replace(region_feature_targets=batch.region_features[positions[:, 0], positions[:, 1]])

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        targets = batch.region_feature_targets
        if targets is None or targets.shape[0] != logits.shape[0]:
            raise ValueError("masked feature regression needs the region_feature_targets its mask step records")
        if targets.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the features have {targets.shape[-1]} dimensions but the visual head's {self.output!r} output has {logits.shape[-1]}")
        count = targets.shape[0]
        if count == 0:
            return nothing_to_score(logits, self.name)
        loss = F.smooth_l1_loss(logits.float(), targets.float(), reduction="none").mean(-1).mean()
        return ObjectiveOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/count": float(count)})
