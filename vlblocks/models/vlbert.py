"""The VL-BERT core, assembled from injected blocks."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.blocks.visual import VisualFeatureEmbedding


class VLBertOutput(NamedTuple):
    """What `VLBert` returns.

    Attributes:
        text_states: [B, L, H] final state of each input token, zeros at padding.
        region_states: [B, N, H] final state of each input region, zeros at padding.
        pooled: [B, H] pooler output, or None without a pooler.
        sequence_states: [B, T, H] the packed sequence (text, regions, [END], padding).
        sequence_mask: [B, T] bool, True up to and including [END].
        attentions: per layer [B, heads, T, T], when asked for.
    """

    text_states: Tensor
    region_states: Tensor
    pooled: Optional[Tensor]
    sequence_states: Tensor
    sequence_mask: Tensor
    attentions: Optional[tuple[Tensor, ...]] = None


def gather_slots(sequence: Tensor, slots: Tensor) -> Tensor:
    """Pick packed states back into input order: [B, T, H] at [B, M] slots (-1 = none) → [B, M, H]."""
    picked = torch.gather(sequence, 1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))
    return picked * (slots >= 0).unsqueeze(-1).to(picked.dtype)


class VLBert(nn.Module):
    """One Transformer over text tokens and image regions (Su et al., 2020).

    region_features → visual_embedding (geometry ⊕ appearance → H) → embedding (packing) →
    encoder → optional pooler. Each part is injected, so a recipe swaps any of them.

    Args:
        region_features: `PrecomputedRegionFeatures` or `EndToEndRegionFeatures` (any module
            mapping a `VLBatch` to [B, N, D] appearance features).
        visual_embedding: `VisualFeatureEmbedding` (D → visual size).
        embedding: `VLEmbedding`.
        encoder: `TransformerEncoder`.
        pooler: `Pooler` or None (VL-BERT pre-training and VQA run without one).

    Inputs:
        batch: `VLBatch`; `token_region_index` (default 0, the whole image) chooses the region
            feature each token sees, `masked_regions` the regions whose [IMG] token is masked.
        output_attentions: also return attention probabilities.

    Returns:
        `VLBertOutput`.
    """

    def __init__(
        self,
        region_features: nn.Module,
        visual_embedding: VisualFeatureEmbedding,
        embedding: VLEmbedding,
        encoder: TransformerEncoder,
        pooler: Optional[Pooler] = None,
    ) -> None:
        super().__init__()
        self.region_features = region_features
        self.visual_embedding = visual_embedding
        self.embedding = embedding
        self.encoder = encoder
        self.pooler = pooler

    def region_vectors(self, batch: VLBatch) -> Tensor:
        """[B, N, visual size]: each region's fused appearance and geometry feature, 0 at padded regions.

        Rows that share an image (`batch.rows_per_image` > 1) share one pass of the front end."""
        shared = batch.image_rows()
        appearance = self.region_features(shared)
        vectors = self.visual_embedding(appearance, shared.boxes, shared.image_sizes, shared.region_mask)
        return vectors.repeat_interleave(batch.rows_per_image, 0) if batch.rows_per_image > 1 else vectors

    def forward(self, batch: VLBatch, output_attentions: bool = False) -> VLBertOutput:
        region_visual = self.region_vectors(batch)
        return self.encode(batch, region_visual, self.text_visual(batch, region_visual), output_attentions)

    @staticmethod
    def text_visual(batch: VLBatch, region_visual: Tensor) -> Tensor:
        """[B, L, visual size]: the region feature each token sees (region 0 unless grounded)."""
        index = batch.token_region_index
        if index is None:
            return region_visual[:, :1].expand(-1, batch.text_ids.shape[1], -1)
        return torch.gather(region_visual, 1, index.unsqueeze(-1).expand(-1, -1, region_visual.shape[-1]))

    def encode(
        self, batch: VLBatch, region_visual: Tensor, text_visual: Tensor, output_attentions: bool = False
    ) -> VLBertOutput:
        """Embed, pack and encode given the visual vectors (lets a text-only stream supply its own)."""
        embedded = self.embedding(
            batch.text_ids,
            batch.segment_ids,
            batch.text_mask,
            text_visual,
            region_visual,
            batch.region_mask,
            batch.masked_regions,
            batch.sequence_length,
        )
        encoded = self.encoder(embedded.embeddings, embedded.attention_mask, output_attentions=output_attentions)
        sequence = encoded.last_hidden_state
        return VLBertOutput(
            text_states=gather_slots(sequence, embedded.text_slots),
            region_states=gather_slots(sequence, embedded.region_slots),
            pooled=self.pooler(sequence) if self.pooler is not None else None,
            sequence_states=sequence,
            sequence_mask=embedded.attention_mask,
            attentions=encoded.attentions,
        )
