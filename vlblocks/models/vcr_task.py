"""VCR fine-tuning: one score per (question, choice) row, plus the auxiliary region loss."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.blocks.task_heads import ChoiceHead, RegionScoreHead
from vlblocks.models.interface import VLModel
from vlblocks.models.task import LossTerm, Task, TaskOutput


def choice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """VL-BERT's `CLASSIFIER_SIGMOID` loss: binary cross-entropy of every choice's logit against
    1 for the right choice and 0 for the others, averaged over all choices (positive weight 1).

    Inputs: logits, labels: [B] (rows of every question's choices). Returns: scalar.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def region_class_loss(logits: Tensor, classes: Tensor, region_mask: Tensor) -> Tensor:
    """Cross-entropy of each valid region's class logits against its detector class.

    Inputs: logits [B, N, C]; classes [B, N] long; region_mask [B, N] bool. Returns: scalar.
    """
    mask = region_mask.bool()
    losses = F.cross_entropy(logits.float().flatten(0, 1), classes.masked_fill(~mask, 0).flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum()


class VCRTask(Task):
    """VL-BERT for VCR (Q→A, or QA→R with the right answer appended to the question).

    Each question comes as `rows_per_image` consecutive rows `[CLS] question [SEP] choice [SEP]`
    (the choice in segment B), grounded words seeing their region. The pooled output →
    `ChoiceHead` → one logit per row; the prediction is the best row of each group.
    `region_head` (VL-BERT's `CNN_LOSS_TOP`) classifies every region's final state into the
    detector's classes, weighted by `region_loss_weight`.

    Inputs: batch with `choice_labels` (and `region_classes` for the auxiliary loss).
    Returns: `TaskOutput`, `model_output` the [B / choices, choices] logits.
    """

    pretrained_prefixes = {"model.vlbert.": "vlbert.", "model.region_head.transform.": "region_head.transform."}

    def __init__(
        self, vlbert: VLModel, head: ChoiceHead, region_head: Optional[RegionScoreHead] = None, region_loss_weight: float = 1.0
    ) -> None:
        super().__init__()
        if getattr(vlbert, "pooler", None) is None:
            raise ValueError("VCR scores choices from the pooled output: give the core model a pooler")
        self.vlbert = vlbert
        self.head = head
        self.region_head = region_head
        self.region_loss_weight = region_loss_weight

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        core = self.vlbert(batch)
        logits = self.head(core.pooled)
        grouped = rearrange(logits, "(q c) -> q c", c=batch.rows_per_image)
        if batch.choice_labels is None:
            return TaskOutput(logits.sum() * 0.0, {}, grouped)
        loss = choice_loss(logits, batch.choice_labels)
        terms = {"vcr": LossTerm(loss)}
        labels = rearrange(batch.choice_labels, "(q c) -> q c", c=batch.rows_per_image).argmax(-1)
        metrics = {
            "vcr/loss": loss.detach(),
            "vcr/accuracy": (grouped.argmax(-1) == labels).float().mean().detach(),
            "vcr/count": float(grouped.shape[0]),
        }
        if self.region_head is not None and batch.region_classes is not None:
            region_loss = region_class_loss(self.region_head(core.region_states), batch.region_classes, batch.region_mask)
            loss = loss + self.region_loss_weight * region_loss
            metrics["vcr_regions/loss"] = region_loss.detach()
            terms["vcr_regions"] = LossTerm(region_loss, self.region_loss_weight)
        metrics["loss"] = loss.detach()
        return TaskOutput(loss, metrics, grouped, terms)

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> dict[str, float]:
        """The choice loss averages over the rows, the region loss over every valid region of
        every row."""
        counts = {"vcr": float(batch.batch_size)}
        if self.region_head is not None and batch.region_classes is not None:
            counts["vcr_regions"] = float(batch.region_mask.sum())
        return counts
