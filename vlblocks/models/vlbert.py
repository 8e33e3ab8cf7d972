"""The single-stream core (VL-BERT, VisualBERT), assembled from injected blocks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder, gather_rows
from vlblocks.models.interface import ScoredPositions, VLOutput, region_vectors

VLBertOutput = VLOutput  # the name of the first release


def gather_slots(sequence: Tensor, slots: Tensor) -> Tensor:
    """Pick packed states back into input order: [B, T, H] at [B, M] slots (-1 = none) → [B, M, H]."""
    picked = gather_rows(sequence, slots.clamp(min=0))
    return picked * (slots >= 0).unsqueeze(-1).to(picked.dtype)


def scored_slots(scored: ScoredPositions, text_slots: Tensor, region_slots: Tensor, length: int) -> Tensor:
    """[B, R] distinct sequence slots of each row, R = min(max(`scored.per_row`, 1), length) (at
    least one row, as some attention kernels refuse empty queries): the scored
    tokens' and regions' packed slots (and [CLS], slot 0, for a pooled output) first, in slot
    order, then other slots to fill the row. No value is read back from the device.

    Inputs: text_slots [B, L], region_slots [B, N] (packed slot of each token / region)."""
    batch = text_slots.shape[0]
    needed = torch.zeros(batch, length, dtype=torch.bool, device=text_slots.device)
    for positions, slots in ((scored.text, text_slots), (scored.regions, region_slots)):
        if positions is not None:
            rows = positions[:, 0]
            needed = needed.index_put((rows, slots[rows, positions[:, 1]]), torch.ones_like(rows, dtype=torch.bool))
    if scored.pooled:
        needed[:, 0] = True
    # A stable sort of 0 (needed) before 1 (not needed) keeps each kind in slot order.
    return torch.argsort((~needed).to(torch.uint8), dim=1, stable=True)[:, : min(max(scored.per_row, 1), length)]


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
        scored: `ScoredPositions`, the final states the caller reads: the last layer computes
            those and fills the rest of its R = `scored.per_row` rows a sample with other
            positions; every other final state is 0. Ignored with `output_attentions`.

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

    def forward(
        self, batch: VLBatch, output_attentions: bool = False, output_hidden_states: bool = False, scored: Optional[ScoredPositions] = None
    ) -> VLOutput:
        region_visual = self.region_vectors(batch)
        return self.encode(batch, region_visual, self.text_visual(batch, region_visual), output_attentions, output_hidden_states, scored)

    @staticmethod
    def text_visual(batch: VLBatch, region_visual: Tensor) -> Tensor:
        """[B, L, visual size]: the region feature each token sees (region 0 unless grounded)."""
        index = batch.token_region_index
        if index is None:
            return region_visual[:, :1].expand(-1, batch.text_ids.shape[1], -1)
        return torch.gather(region_visual, 1, index.unsqueeze(-1).expand(-1, -1, region_visual.shape[-1]))

    def encode(
        self,
        batch: VLBatch,
        region_visual: Tensor,
        text_visual: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        scored: Optional[ScoredPositions] = None,
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
        rows = None
        if scored is not None and not output_attentions:
            rows = scored_slots(scored, embedded.text_slots, embedded.region_slots, embedded.attention_mask.shape[1])
        encoded = self.encoder(
            embedded.embeddings,
            embedded.attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            last_layer_rows=rows,
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
