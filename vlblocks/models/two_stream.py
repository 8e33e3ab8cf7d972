"""A two-stream core (LXMERT): a language stream and a region stream joined by co-attention."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.co_attention import CoAttentionEncoder
from vlblocks.blocks.embeddings import RegionEmbedding, TextEmbedding
from vlblocks.blocks.encoder import Pooler
from vlblocks.models.interface import ScoredPositions, VLOutput, region_vectors


class TwoStreamModel(nn.Module):
    """Text and regions embedded apart, encoded by a `CoAttentionEncoder` (Tan & Bansal, 2019).

    region_features → visual_embedding (LXMERT: `AveragedRegionFeatureEmbedding`) → optional
    region_embedding; text → text_embedding; both → encoder → pooler over the language stream's
    first token. It offers the model interface (`vlblocks.models.interface.VLModel`).

    Args:
        region_features: `PrecomputedRegionFeatures` or `EndToEndRegionFeatures`.
        visual_embedding: maps (appearance, boxes, image sizes, mask) to [B, N, H].
        text_embedding: `TextEmbedding` (its own LayerNorm and dropout).
        encoder: `CoAttentionEncoder`.
        pooler: `Pooler` or None.
        region_embedding: `RegionEmbedding` applied after `visual_embedding` (e.g. a
            masked-region token), or None (LXMERT).

    Inputs:
        batch: `VLBatch` (`masked_regions` reaches `region_embedding` only).
        output_attentions, output_hidden_states: fill `VLOutput.streams` with them.

    Returns:
        `VLOutput` with `streams` set (`sequence_states` None).
    """

    def __init__(
        self,
        region_features: nn.Module,
        visual_embedding: nn.Module,
        text_embedding: TextEmbedding,
        encoder: CoAttentionEncoder,
        pooler: Optional[Pooler] = None,
        region_embedding: Optional[RegionEmbedding] = None,
    ) -> None:
        super().__init__()
        self.region_features = region_features
        self.visual_embedding = visual_embedding
        self.text_embedding = text_embedding
        self.region_embedding = region_embedding
        self.encoder = encoder
        self.pooler = pooler

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text_embedding.word_embeddings

    @property
    def segment_embeddings(self) -> nn.Embedding:
        return self.text_embedding.token_type_embeddings

    @property
    def visual_size(self) -> int:
        return self.visual_embedding.out_features

    def region_vectors(self, batch: VLBatch) -> Tensor:
        """[B, N, H]: each region's embedded appearance and box, 0 at padded regions."""
        return region_vectors(self.region_features, self.visual_embedding, batch)

    def forward(
        self, batch: VLBatch, output_attentions: bool = False, output_hidden_states: bool = False, scored: Optional[ScoredPositions] = None
    ) -> VLOutput:
        region_visual = self.region_vectors(batch)
        return self.encode(batch, region_visual, region_visual[:, :1].expand(-1, batch.text_ids.shape[1], -1), output_attentions, output_hidden_states)

    def encode(
        self,
        batch: VLBatch,
        region_visual: Tensor,
        text_visual: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        scored: Optional[ScoredPositions] = None,
    ) -> VLOutput:
        """Embed and encode given the region vectors; `text_visual` reaches the text embedding
        only when it has a visual term. `scored` is not used: both streams' states are computed
        everywhere."""
        uses_visual = self.text_embedding.visual_text is not None
        text = self.text_embedding(batch.text_ids, batch.segment_ids, text_visual if uses_visual else None)
        regions = region_visual
        if self.region_embedding is not None:
            regions = self.region_embedding(region_visual, batch.masked_regions)
        text_mask, region_mask = batch.text_mask.bool(), batch.region_mask.bool()
        streams = self.encoder(text, text_mask, regions.to(text.dtype), region_mask, output_hidden_states, output_attentions)
        return VLOutput(
            text_states=streams.text * text_mask.unsqueeze(-1).to(streams.text.dtype),
            region_states=streams.regions * region_mask.unsqueeze(-1).to(streams.regions.dtype),
            pooled=self.pooler(streams.text) if self.pooler is not None else None,
            streams=streams,
        )
