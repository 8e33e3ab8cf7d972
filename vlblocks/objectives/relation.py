"""Caption-image relation prediction / image-text matching (VL-BERT's ablation; VisualBERT's and LXMERT's objective)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput
from vlblocks.seeding import row_generators

TEXT_FIELDS = ("text_ids", "segment_ids", "text_mask", "token_region_index", "word_index", "mlm_labels")
RELATION_SALT = 3  # this objective's draws for a sample, apart from every other objective's


class CaptionImageRelation(PretrainingObjective):
    """With `probability`, a row's caption is swapped for the next row's (mismatched); otherwise
    it is kept. Loss: cross-entropy of the model's `relation_head` logits on the pooled output,
    whose class `matched_class` means "matched" (VL-BERT and LXMERT: 1; VisualBERT: 0).
    List it before masked LM, so the masking sees the caption the row ends up with.

    Args:
        probability: of a swap (0.5).
        weight: factor of this loss in the total. name: metric prefix.
        matched_class: the logit that means "the caption matches the image".

    `relation_labels` [B] holds the class index of each row (`matched_class` or the other one),
    `caption_matches` [B] whether the row kept its own caption.
    """

    head = "relation_head"
    states = "pooled"

    def __init__(self, probability: float = 0.5, weight: float = 1.0, name: str = "relation", matched_class: int = 1) -> None:
        super().__init__()
        if matched_class not in (0, 1):
            raise ValueError(f"matched_class must be 0 or 1, not {matched_class}")
        self.probability = probability
        self.weight = weight
        self.name = name
        self.matched_class = matched_class

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
        matched = ~swap if self.matched_class == 1 else swap
        swapped = batch.replace(**changes, relation_labels=matched.long(), caption_matches=~swap)
        return swapped.replace(sequence_length=swapped.packed_length() if batch.sequence_length is not None else None)

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        loss = F.cross_entropy(logits.float(), batch.relation_labels)
        accuracy = (logits.argmax(-1) == batch.relation_labels).float().mean()
        return ObjectiveOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/accuracy": accuracy})


class ImageTextMatching(CaptionImageRelation):
    """Image-text matching as VisualBERT and LXMERT name it: `CaptionImageRelation` under the
    metric name "itm" (the same swap, head and loss; set `matched_class` to the checkpoint's)."""

    def __init__(self, probability: float = 0.5, weight: float = 1.0, name: str = "itm", matched_class: int = 1) -> None:
        super().__init__(probability, weight, name, matched_class)
