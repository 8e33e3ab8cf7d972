"""VL-BERT with its pre-training heads; the MLM decoder is tied to the word embeddings."""

from __future__ import annotations

import contextlib
from typing import ContextManager, NamedTuple, Optional

from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.heads import MaskedLMHead, MaskedRegionHead, RegionPredictionHead, RelationHead
from vlblocks.blocks.word_embedding import WordEmbedding
from vlblocks.models.interface import VLModel, VLOutput


class PretrainingOutput(NamedTuple):
    """`core`: the `VLOutput`; `mlm_logits` [K_t, V] at the selected tokens;
    `region_logits` [K_r, C] at the selected regions; `relation_logits` [B, 2]; `visual_predictions`
    name → [K_r, size] of the region prediction head at the selected regions. Absent heads give None."""

    core: VLOutput
    mlm_logits: Optional[Tensor]
    region_logits: Optional[Tensor]
    relation_logits: Optional[Tensor]
    visual_predictions: Optional[dict[str, Tensor]] = None


class VLBertForPretraining(nn.Module):
    """A core model (any `VLModel`: VL-BERT, VisualBERT, LXMERT) plus its pre-training heads.

    Args:
        vlbert: the core model (`VLBert` or `TwoStreamModel`; the name is the state-dict prefix).
        mlm_head: `MaskedLMHead` (tied here to `vlbert.word_embeddings`) or None.
        region_head: `MaskedRegionHead` or None.
        relation_head: `RelationHead` or None (needs a pooler; off in VL-BERT's configs; the
            image-text matching head of VisualBERT and LXMERT).
        visual_head: `RegionPredictionHead` or None (LXMERT's object, attribute and feature predictions).

    Inputs:
        batch: `VLBatch`.
        token_select: tokens to score, [K, 2] positions or [B, L] bool; default
            `batch.mlm_positions` (else `batch.mlm_labels >= 0`).
        region_select: regions to classify, [K, 2] positions or [B, N] bool; default
            `batch.region_positions` (else the rows of `batch.region_targets` that hold a
            distribution, else `batch.masked_regions`).

    Returns:
        `PretrainingOutput`.
    """

    def __init__(
        self,
        vlbert: VLModel,
        mlm_head: Optional[MaskedLMHead] = None,
        region_head: Optional[MaskedRegionHead] = None,
        relation_head: Optional[RelationHead] = None,
        visual_head: Optional[RegionPredictionHead] = None,
    ) -> None:
        super().__init__()
        if relation_head is not None and getattr(vlbert, "pooler", None) is None:
            raise ValueError("the relation head reads the pooled output, but the core model has no pooler")
        self.vlbert = vlbert
        self.mlm_head = mlm_head
        self.region_head = region_head
        self.relation_head = relation_head
        self.visual_head = visual_head
        if mlm_head is not None:
            mlm_head.tie_to(vlbert.word_embeddings)

    def forward(
        self, batch: VLBatch, token_select: Optional[Tensor] = None, region_select: Optional[Tensor] = None
    ) -> PretrainingOutput:
        with self.one_word_gradient():
            core = self.vlbert(batch)
            return self.heads(core, batch, token_select, region_select)

    def one_word_gradient(self) -> ContextManager[None]:
        """A context for one forward pass in which the word lookups and the tied MLM decoder give
        the word table one gradient buffer, not two and their sum (`WordEmbedding.one_gradient`:
        the same gradient with two fewer [V, H] tensors at the peak)."""
        words = self.vlbert.word_embeddings
        if self.mlm_head is None or not isinstance(words, WordEmbedding):
            return contextlib.nullcontext()
        return words.one_gradient()

    def heads(
        self, core: VLOutput, batch: VLBatch, token_select: Optional[Tensor] = None, region_select: Optional[Tensor] = None
    ) -> PretrainingOutput:
        """Apply the heads to an already computed core output."""
        if token_select is None:
            token_select = batch.mlm_positions
            if token_select is None and batch.mlm_labels is not None:
                token_select = batch.mlm_labels >= 0
        if region_select is None:
            region_select = batch.region_positions
            if region_select is None:
                region_select = batch.region_targets.sum(-1) > 0 if batch.region_targets is not None else batch.masked_regions
        mlm_logits = self.mlm_head(core.text_states, token_select) if self.mlm_head is not None else None
        region_logits = self.region_head(core.region_states, region_select) if self.region_head is not None else None
        relation_logits = self.relation_head(core.pooled) if self.relation_head is not None else None
        visual_predictions = self.visual_head(core.region_states, region_select) if self.visual_head is not None else None
        return PretrainingOutput(core, mlm_logits, region_logits, relation_logits, visual_predictions)
