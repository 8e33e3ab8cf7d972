"""Masked language modelling with whole-word masking (VL-BERT's "MLM with visual clues")."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput, nothing_to_score
from vlblocks.seeding import row_generators

MLM_SALT = 1  # this objective's draws for a sample, apart from every other objective's
MLM_REPLACEMENT_SALT = 4  # its random replacement ids, a stream of their own (see `mask`)


class MaskedLanguageModeling(PretrainingObjective):
    """Whole-word masking: each word is chosen with `probability`; a chosen word has all its
    WordPieces replaced by [MASK] (`mask_fraction`), each piece by a random id drawn uniformly
    from the whole vocabulary (`random_fraction`), or kept (the rest). Labels are the original
    ids at chosen pieces, -1 elsewhere. The loss is cross-entropy averaged over chosen pieces.

    Args:
        vocab_size: V, the range of random replacements (the tokenizer's vocabulary).
        mask_token_id: id of [MASK]. Both may be left unset in a recipe and filled from the
            tokenizer by `use_vocabulary` (the training command does).
        probability, mask_fraction, random_fraction: 0.15, 0.8, 0.1 in BERT and VL-BERT.
        weight: factor of this loss in the total.
        name: prefix of the metric names.
        matched_only: mask only rows whose caption is their image's (`batch.caption_matches`, set
            by a matching objective listed before): a swapped caption then gives no word to
            predict from an image that does not show it (UNITER's conditional masking). Off in
            VL-BERT, VisualBERT and LXMERT.

    `mask(batch, seeds)` runs on the host (CPU tensors, before the batch goes to its device):
    each row draws from its own generator seeded by `seeds[b]`, so a sample's masking does not
    depend on the batch around it. It needs `batch.word_index` [B, L] (-1 at special tokens,
    which are never chosen) and returns a batch with masked `text_ids`, `mlm_labels` and the
    [K, 2] `mlm_positions` of the chosen pieces.
    `loss(logits, batch)` takes [K, V] logits at `mlm_positions`; it scores with the model's
    `mlm_head` over the text states.

    The official code masks the whole caption before it truncates it to the text + box budget.
    Here word w's two draws are the w-th of one per-row stream and piece t's random id the t-th
    of another, so the decisions for the pieces a truncation keeps are the same as those of the
    untruncated caption: masking then truncating and truncating then masking agree exactly.
    """

    def __init__(
        self,
        vocab_size: Optional[int] = None,
        mask_token_id: Optional[int] = None,
        probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        weight: float = 1.0,
        name: str = "mlm",
        matched_only: bool = False,
    ) -> None:
        super().__init__()
        self.matched_only = matched_only
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.weight = weight
        self.name = name

    head = "mlm_head"
    states = "text"

    def positions(self, batch: VLBatch) -> Optional[Tensor]:
        return batch.mlm_positions

    def use_vocabulary(self, vocab_size: int, mask_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        if self.vocab_size is None or self.mask_token_id is None:
            raise ValueError("masked LM needs vocab_size and mask_token_id (set them or call use_vocabulary)")
        if batch.word_index is None:
            raise ValueError("whole-word masking needs batch.word_index (the word each WordPiece belongs to)")
        words = batch.word_index
        maskable = (words >= 0) & batch.text_mask.bool()
        if self.matched_only:
            if batch.caption_matches is None:
                raise ValueError("masked LM on matched captions only needs a matching objective (ImageTextMatching) listed before it")
            maskable = maskable & batch.caption_matches.bool()[:, None]
        lengths = batch.text_mask.sum(1).tolist()
        word_counts = (words.max(1).values + 1).clamp(min=1).tolist() if words.shape[1] else [1] * batch.batch_size
        per_word = torch.zeros(batch.batch_size, max(word_counts, default=1), 2)
        random_ids = torch.zeros_like(batch.text_ids)
        word_generators, replacement_generators = row_generators(seeds, MLM_SALT), row_generators(seeds, MLM_REPLACEMENT_SALT)
        for row, (word_generator, replacement_generator) in enumerate(zip(word_generators, replacement_generators)):
            per_word[row, : word_counts[row]] = torch.rand(word_counts[row], 2, generator=word_generator)
            random_ids[row, : lengths[row]] = torch.randint(0, self.vocab_size, (lengths[row],), generator=replacement_generator)
        per_token = torch.gather(per_word, 1, words.clamp(min=0).unsqueeze(-1).expand(-1, -1, 2))
        chosen = maskable & (per_token[..., 0] < self.probability)
        action = per_token[..., 1]
        masked_ids = torch.where(action < self.mask_fraction, torch.full_like(random_ids, self.mask_token_id), batch.text_ids)
        masked_ids = torch.where(
            (action >= self.mask_fraction) & (action < self.mask_fraction + self.random_fraction), random_ids, masked_ids
        )
        return batch.replace(
            text_ids=torch.where(chosen, masked_ids, batch.text_ids),
            mlm_labels=torch.where(chosen, batch.text_ids, torch.full_like(batch.text_ids, -1)),
            mlm_positions=chosen.nonzero(),
        )

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        positions = batch.mlm_positions
        labels = batch.mlm_labels[positions[:, 0], positions[:, 1]]
        return token_prediction_loss(logits, labels, self.name)


def token_prediction_loss(logits: Tensor, labels: Tensor, name: str) -> ObjectiveOutput:
    """Mean cross-entropy of [K, V] logits against [K] labels; 0 (and count 0) when K = 0."""
    count = labels.shape[0]
    if count == 0:
        return nothing_to_score(logits, name)
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return ObjectiveOutput(loss, {f"{name}/loss": loss.detach(), f"{name}/accuracy": accuracy, f"{name}/count": float(count)})
