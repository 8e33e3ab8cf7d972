"""Caption-image relation prediction (off in VL-BERT's released configs; here for ablations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.objectives.output import ObjectiveOutput
from vlblocks.seeding import row_generators

TEXT_FIELDS = ("text_ids", "segment_ids", "text_mask", "token_region_index", "word_index", "mlm_labels")
RELATION_SALT = 3  # this objective's draws for a sample, apart from every other objective's


class CaptionImageRelation(nn.Module):
    """With `probability`, a row's caption is swapped for the next row's (label 0, mismatched);
    otherwise label 1. Loss: cross-entropy of the relation head's logits on the pooled output.
    Apply it before masked LM, so the masking sees the caption the row ends up with.
    """

    def __init__(self, probability: float = 0.5, weight: float = 1.0, name: str = "relation") -> None:
        super().__init__()
        self.probability = probability
        self.weight = weight
        self.name = name

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        """Swap captions on the host (CPU tensors): row b's draw comes from `seeds[b]`; the
        caption it takes is the next row's, so unlike the other objectives this one depends
        on the batch."""
        swap = torch.tensor([bool(torch.rand(1, generator=g) < self.probability) for g in row_generators(seeds, RELATION_SALT)])
        if batch.batch_size < 2:
            swap = torch.zeros_like(swap)
        changes = {}
        for name in TEXT_FIELDS:
            value = getattr(batch, name)
            if value is not None:
                changes[name] = torch.where(swap.view(-1, *([1] * (value.dim() - 1))), value.roll(-1, dims=0), value)
        swapped = batch.replace(**changes, relation_labels=(~swap).long())
        return swapped.replace(sequence_length=swapped.packed_length() if batch.sequence_length is not None else None)

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        loss = F.cross_entropy(logits.float(), batch.relation_labels)
        accuracy = (logits.argmax(-1) == batch.relation_labels).float().mean()
        return ObjectiveOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/accuracy": accuracy})
