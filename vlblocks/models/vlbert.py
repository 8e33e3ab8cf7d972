"""The single-stream core (VL-BERT, VisualBERT), assembled from injected blocks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.models.interface import VLOutput, region_vectors

VLBertOutput = VLOutput  # the name of the first release


def gather_slots(sequence: Tensor, slots: Tensor) -> Tensor:
    """Pick packed states back into input order: [B, T, H] at [B, M] slots (-1 = none) → [B, M, H]."""
    picked = torch.gather(sequence, 1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))
    return picked * (slots >= 0).unsqueeze(-1).to(picked.dtype)


class VLBert(nn.Module):
    """One Transformer over text tokens and image regions (Su et al., 2020); with VisualBERT's
    blocks bound (a projected feature, the concatenating `VLEmbedding`), VisualBERT.

    region_features → visual_embedding (geometry ⊕ appearance → H) → embedding (packing) →
    encoder → optional pooler. Each part is injected, so a recipe swaps any of them. It offers
    the model interface (`vlblocks.models.interface.VLModel`).

    Args:
        region_features: `PrecomputedRegionFeatures` or `EndToEndRegionFeatures` (any module
            mapping a `VLBatch` to [B, N, D] appearance features).
        visual_embedding: `VisualFeatureEmbedding` or `AveragedRegionFeatureEmbedding` (D → visual size).
        embedding: `VLEmbedding`.
        encoder: `TransformerEncoder`.
        pooler: `Pooler` or None (VL-BERT pre-training and VQA run without one).

    Inputs:
        batch: `VLBatch`; `token_region_index` (default 0, the whole image) chooses the region
            feature each token sees, `masked_regions` the regions whose [IMG] token is masked.
        output_attentions: also return attention probabilities.
        output_hidden_states: also return the sequence after the embedding and after each layer.

    Returns:
        `VLOutput` (`sequence_states`, `sequence_mask` set).
    """

    def __init__(
        self,
        region_features: nn.Module,
        visual_embedding: nn.Module,
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

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    @property
    def segment_embeddings(self) -> nn.Embedding:
        return self.embedding.token_type_embeddings

    @property
    def visual_size(self) -> int:
        return self.embedding.visual_size

    def region_vectors(self, batch: VLBatch) -> Tensor:
        """[B, N, visual size]: each region's fused appearance and geometry feature, 0 at padded regions."""
        return region_vectors(self.region_features, self.visual_embedding, batch)

    def forward(self, batch: VLBatch, output_attentions: bool = False, output_hidden_states: bool = False) -> VLOutput:
        region_visual = self.region_vectors(batch)
        return self.encode(batch, region_visual, self.text_visual(batch, region_visual), output_attentions, output_hidden_states)

    @staticmethod
    def text_visual(batch: VLBatch, region_visual: Tensor) -> Tensor:
        """[B, L, visual size]: the region feature each token sees (region 0 unless grounded)."""
        index = batch.token_region_index
        if index is None:
            return region_visual[:, :1].expand(-1, batch.text_ids.shape[1], -1)
        return torch.gather(region_visual, 1, index.unsqueeze(-1).expand(-1, -1, region_visual.shape[-1]))

    def encode(
        self, batch: VLBatch, region_visual: Tensor, text_visual: Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> VLOutput:
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
        encoded = self.encoder(
            embedded.embeddings, embedded.attention_mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        sequence = encoded.last_hidden_state
        return VLOutput(
            text_states=gather_slots(sequence, embedded.text_slots),
            region_states=gather_slots(sequence, embedded.region_slots),
            pooled=self.pooler(sequence) if self.pooler is not None else None,
            sequence_states=sequence,
            sequence_mask=embedded.attention_mask,
            attentions=encoded.attentions,
            hidden_states=encoded.hidden_states,
        )
