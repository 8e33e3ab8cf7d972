"""VL-BERT's input embedding: text tokens and regions packed into one sequence."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from vlblocks.blocks.initialization import init_bert_weights
from vlblocks.blocks.normalization import LayerNorm

VISUAL_SEGMENT = 2


class VLEmbeddingOutput(NamedTuple):
    """What `VLEmbedding` returns.

    Attributes:
        embeddings: [B, T, H] packed sequence after LayerNorm and dropout, with
            T = max over rows of (valid text + valid regions) + 1.
        attention_mask: [B, T] bool, True up to and including each row's [END].
        text_slots: [B, L] long, the packed slot of each valid text token (-1 at padding).
        region_slots: [B, N] long, the packed slot of each valid region (-1 at padding).
        position_ids: [B, T] long.
        segment_ids: [B, T] long.
    """

    embeddings: Tensor
    attention_mask: Tensor
    text_slots: Tensor
    region_slots: Tensor
    position_ids: Tensor
    segment_ids: Tensor


class VisualTerm(nn.Module):
    """Maps a region feature into the word-embedding space: optional Linear, then LayerNorm or a scalar.

    With `layer_norm=True` the LayerNorm's weight starts at `scale_init` (VL-BERT uses 0, so the
    visual term is zero at initialisation); otherwise a learned scalar starts at `scale_init`.

    Args:
        visual_size: size of the incoming region feature.
        hidden_size: size of the word embeddings.
        layer_norm: LayerNorm (True) or learned scalar scale (False).
        scale_init: initial LayerNorm weight or scalar.
        layer_norm_eps: LayerNorm epsilon.

    Inputs:
        features: [..., visual_size].

    Returns:
        [..., hidden_size].
    """

    def __init__(
        self,
        visual_size: int,
        hidden_size: int,
        layer_norm: bool = True,
        scale_init: float = 0.0,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.projection = nn.Linear(visual_size, hidden_size) if visual_size != hidden_size else None
        if layer_norm:
            self.LayerNorm: Optional[LayerNorm] = LayerNorm(hidden_size, eps=layer_norm_eps)
            nn.init.constant_(self.LayerNorm.weight, scale_init)
            self.scale = None
        else:
            self.LayerNorm = None
            self.scale: Optional[nn.Parameter] = nn.Parameter(torch.full((1,), float(scale_init)))

    def forward(self, features: Tensor) -> Tensor:
        if self.projection is not None:
            features = self.projection(features)
        if self.LayerNorm is not None:
            return self.LayerNorm(features)
        return features * self.scale


class VLEmbedding(nn.Module):
    """Word, visual, segment and position embeddings of text and regions, packed as VL-BERT packs them.

    Each row becomes `[valid text][valid regions][END][padding]`. A text token's embedding is
    `word + visual_text(v)` where v is the feature of the region the token looks at (region 0,
    the whole image, unless grounded). A region's is `[IMG] + visual_region(feature)`, with the
    learned masked-region token in place of [IMG] where the region is masked. [END] is a learned
    vector alone. Segments: text as given, regions and [END] = 2, padding 0. Positions: text
    0..n-1, every region n, [END] n+1, padding its slot index. Then LayerNorm and dropout.
    Padding slots hold zeros before the LayerNorm and are masked out of attention.

    Args:
        vocab_size: WordPiece vocabulary size.
        hidden_size: H.
        visual_size: size of the region features entering the embedding; a Linear maps them
            to H when it differs from H.
        max_position_embeddings: position table size.
        type_vocab_size: segment table size (3: A, B and visual).
        visual_layer_norm: LayerNorm on the visual terms (True) or a learned scalar (False).
        visual_scale_init: initial LayerNorm weight / scalar of the visual terms (VL-BERT's
            VISUAL_SCALE_TEXT_INIT and VISUAL_SCALE_OBJECT_INIT, both 0).
        region_visual_scale_init: a different initial value for the regions' visual term.
        layer_norm_eps: epsilon of every LayerNorm.
        dropout: dropout after the LayerNorm.
        initializer_range: std of the normal initialisation.

    Inputs:
        text_ids: [B, L] long.
        segment_ids: [B, L] long.
        text_mask: [B, L] bool.
        text_visual: [B, L, visual_size] region feature seen by each token.
        region_visual: [B, N, visual_size] feature of each region (N may be 0).
        region_mask: [B, N] bool.
        masked_regions: [B, N] bool or None.
        sequence_length: T, the packed length, when the caller counted it (`VLBatch.packed_length`);
            None counts it here, which waits for the device.

    Returns:
        `VLEmbeddingOutput`.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        visual_size: int = 768,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 3,
        visual_layer_norm: bool = True,
        visual_scale_init: float = 0.0,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        region_visual_scale_init: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.end_embedding = nn.Embedding(1, hidden_size)
        self.image_token = nn.Embedding(1, hidden_size)
        self.masked_region_token = nn.Embedding(1, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        init_bert_weights(self, initializer_range)
        self.visual_text = VisualTerm(visual_size, hidden_size, visual_layer_norm, visual_scale_init, layer_norm_eps)
        region_scale = visual_scale_init if region_visual_scale_init is None else region_visual_scale_init
        self.visual_region = VisualTerm(visual_size, hidden_size, visual_layer_norm, region_scale, layer_norm_eps)
        for term in (self.visual_text, self.visual_region):
            if term.projection is not None:
                init_bert_weights(term.projection, initializer_range)
        self.hidden_size = hidden_size
        self.visual_size = visual_size

    def forward(
        self,
        text_ids: Tensor,
        segment_ids: Tensor,
        text_mask: Tensor,
        text_visual: Tensor,
        region_visual: Tensor,
        region_mask: Tensor,
        masked_regions: Optional[Tensor] = None,
        sequence_length: Optional[int] = None,
    ) -> VLEmbeddingOutput:
        text_mask, region_mask = text_mask.bool(), region_mask.bool()
        batch, device = text_ids.shape[0], text_ids.device
        text_vectors = self.word_embeddings(text_ids) + self.visual_text(text_visual)
        region_word = self.image_token.weight[0].expand(*region_mask.shape, -1)
        if masked_regions is not None:
            region_word = torch.where(masked_regions.bool().unsqueeze(-1), self.masked_region_token.weight[0], region_word)
        region_vectors = region_word + self.visual_region(region_visual)

        text_count = text_mask.sum(1)
        region_count = region_mask.sum(1)
        end_slot = text_count + region_count  # [B]
        if sequence_length is None:
            sequence_length = int(end_slot.max().item()) + 1 if batch > 0 else 1
        length = sequence_length
        # Padding is scattered to one extra slot, `length`, that is cut off afterwards: the
        # scatter keeps fixed shapes (no boolean indexing, so nothing waits for the device).
        text_slots = torch.where(text_mask, text_mask.long().cumsum(1) - 1, length)
        region_slots = torch.where(region_mask, text_count[:, None] + region_mask.long().cumsum(1) - 1, length)

        packed = text_vectors.new_zeros(batch, length + 1, self.hidden_size)
        rows_text = torch.arange(batch, device=device)[:, None].expand_as(text_slots)
        rows_region = torch.arange(batch, device=device)[:, None].expand_as(region_slots)
        packed = packed.index_put((rows_text, text_slots), text_vectors)
        packed = packed.index_put((rows_region, region_slots), region_vectors.to(packed.dtype))
        rows = torch.arange(batch, device=device)
        packed = packed.index_put((rows, end_slot), self.end_embedding.weight[0].expand(batch, -1).to(packed.dtype))[:, :length]
        text_slots = text_slots.masked_fill(~text_mask, -1)
        region_slots = region_slots.masked_fill(~region_mask, -1)

        slot = torch.arange(length, device=device).expand(batch, length)
        is_visual = (slot >= text_count[:, None]) & (slot <= end_slot[:, None])
        packed_segments = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
        packed_segments = packed_segments.index_put((rows_text, text_slots.masked_fill(~text_mask, length)), segment_ids)[:, :length]
        packed_segments = packed_segments.masked_fill(is_visual, VISUAL_SEGMENT)
        positions = slot.clone()
        positions = torch.where(is_visual, text_count[:, None], positions)
        positions = torch.where(slot == end_slot[:, None], text_count[:, None] + 1, positions)
        attention_mask = slot <= end_slot[:, None]

        embeddings = packed + self.position_embeddings(positions) + self.token_type_embeddings(packed_segments)
        embeddings = self.dropout(self.LayerNorm(embeddings))
        return VLEmbeddingOutput(embeddings, attention_mask, text_slots, region_slots, positions, packed_segments)
