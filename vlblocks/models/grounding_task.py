"""Referring expressions (RefCOCO+): score every region, the best one is the answer."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.blocks.task_heads import RegionScoreHead
from vlblocks.models.interface import VLModel
from vlblocks.models.task import LossTerm, Task, TaskOutput


def grounding_loss(scores: Tensor, labels: Tensor, region_mask: Tensor) -> Tensor:
    """Binary cross-entropy of each valid region's score against its label, averaged over the
    valid regions of the batch (VL-BERT's RefCOCO+ loss).

    Inputs: scores, labels: [B, N] float; region_mask: [B, N] bool. Returns: scalar.
    """
    weights = region_mask.float()
    losses = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), weight=weights, reduction="sum")
    return losses / weights.sum()


def pick_region(scores: Tensor, region_mask: Tensor) -> Tensor:
    """[B] the best-scoring valid region of each row (the whole-image box included)."""
    return scores.float().masked_fill(~region_mask.bool(), float("-inf")).argmax(-1)


class ReferringExpressionTask(Task):
    """VL-BERT for RefCOCO+: `[CLS] expression [SEP]` with the candidate regions; each region's
    state → `RegionScoreHead` → one score.

    Accuracy (`refcoco/accuracy`) is the share of rows whose best region has IoU > 0.5 with
    the referred box, read from `region_labels` (which hold exactly that per region).

    Inputs: batch with `region_labels` for a loss. Returns: `TaskOutput`, `model_output` [B, N].
    """

    pretrained_prefixes = {"model.vlbert.": "vlbert.", "model.region_head.transform.": "head.transform."}

    def __init__(self, vlbert: VLModel, head: RegionScoreHead) -> None:
        super().__init__()
        self.vlbert = vlbert
        self.head = head

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        scores = self.head(self.vlbert(batch).region_states)
        if batch.region_labels is None:
            return TaskOutput(scores.sum() * 0.0, {}, scores)
        loss = grounding_loss(scores, batch.region_labels, batch.region_mask)
        picked = pick_region(scores, batch.region_mask)
        hits = batch.region_labels.gather(1, picked[:, None]).squeeze(1)
        metrics = {
            "refcoco/loss": loss.detach(),
            "refcoco/accuracy": hits.float().mean().detach(),
            "refcoco/count": float(batch.batch_size),
            "loss": loss.detach(),
        }
        return TaskOutput(loss, metrics, scores, {"refcoco": LossTerm(loss)})

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> dict[str, float]:
        """The loss averages over every valid region of the batch."""
        return {"refcoco": float(batch.region_mask.sum())}
