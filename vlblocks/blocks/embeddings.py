"""Text and region embeddings, alone (two-stream models) or packed into one sequence (`VLEmbedding`)."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor, nn

from vlblocks.blocks.dropout import Dropout
from vlblocks.blocks.initialization import init_bert_weights
from vlblocks.blocks.normalization import LayerNorm
from vlblocks.blocks.word_embedding import WordEmbedding

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


RegionPositions = Literal["after_text", "zero"]


def _text_terms(module: nn.Module, text_ids: Tensor, segment_ids: Tensor, position_ids: Tensor, text_visual: Optional[Tensor]) -> Tensor:
    """word + position + segment (+ `visual_text` of each token's region feature) of a module
    holding those tables: [B, L] ids → [B, L, H]."""
    vectors = module.word_embeddings(text_ids)
    if module.visual_text is not None:
        if text_visual is None:
            raise ValueError("this embedding adds each token's region feature (visual_text), but none was given")
        vectors = vectors + module.visual_text(text_visual)
    return vectors + module.position_embeddings(position_ids) + module.token_type_embeddings(segment_ids)


def _region_token_terms(module: nn.Module, region_visual: Tensor, masked_regions: Optional[Tensor]) -> Tensor:
    """[IMG] (or the masked-region token where masked, when the module has them) + the regions'
    visual term (or the feature itself without one): [B, N, visual size] → [B, N, H]."""
    vectors = module.visual_region(region_visual) if module.visual_region is not None else region_visual
    if module.image_token is None:
        return vectors
    word = module.image_token.weight[0].expand(*region_visual.shape[:-1], -1)
    if masked_regions is not None:
        word = torch.where(masked_regions.bool().unsqueeze(-1), module.masked_region_token.weight[0], word)
    return word + vectors.to(word.dtype)


class TextEmbedding(nn.Module):
    """A stand-alone text embedding: word + position + segment (+ an optional visual term), then
    LayerNorm and dropout (BERT's and LXMERT's language embedding; parameter names as HF `BertEmbeddings`).

    Args:
        vocab_size, hidden_size, max_position_embeddings, type_vocab_size: table sizes.
        visual_size: size of a per-token region feature added through a `VisualTerm`
            (`visual_text`); None: no visual term (BERT, LXMERT).
        layer_norm_eps, dropout, initializer_range: as BERT.

    Inputs:
        text_ids: [B, L] long. segment_ids: [B, L] long.
        text_visual: [B, L, visual_size] or None. position_ids: [B, L] long, default 0..L-1.

    Returns:
        [B, L, H].
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        visual_size: Optional[int] = None,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.word_embeddings = WordEmbedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)
        init_bert_weights(self, initializer_range)
        self.visual_text = VisualTerm(visual_size, hidden_size, True, 0.0, layer_norm_eps) if visual_size is not None else None

    def forward(
        self, text_ids: Tensor, segment_ids: Tensor, text_visual: Optional[Tensor] = None, position_ids: Optional[Tensor] = None
    ) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
        return self.dropout(self.LayerNorm(_text_terms(self, text_ids, segment_ids, position_ids, text_visual)))


class RegionEmbedding(nn.Module):
    """A stand-alone region embedding: optional [IMG] / masked-region tokens + the region feature
    (through an optional `VisualTerm`) + optional position and segment tables, then optional
    LayerNorm and dropout. With no token, no tables and no normalisation it passes the region
    feature embedding's output through (LXMERT, whose regions are embedded by their feature encoder).

    Args:
        hidden_size: H.
        visual_size: size of the incoming region features; a `VisualTerm` (`visual_region`) maps
            them when `visual_term` is True, else they must already be H wide.
        region_token: learned [IMG] and masked-region tokens (`image_token`, `masked_region_token`).
        visual_term: map the features through `visual_region` (Linear when sizes differ, LayerNorm).
        max_position_embeddings, type_vocab_size: sizes of own `position_embeddings` /
            `token_type_embeddings` tables; 0 for none.
        segment: the regions' segment id in their table.
        normalize: LayerNorm + dropout at the end.
        layer_norm_eps, dropout, initializer_range: as BERT.

    Inputs:
        region_visual: [B, N, visual_size]. masked_regions: [B, N] bool or None.

    Returns:
        [B, N, H] (every region at position 0 of its table).
    """

    def __init__(
        self,
        hidden_size: int = 768,
        visual_size: int = 768,
        region_token: bool = False,
        visual_term: bool = False,
        max_position_embeddings: int = 0,
        type_vocab_size: int = 0,
        segment: int = 0,
        normalize: bool = False,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.image_token = nn.Embedding(1, hidden_size) if region_token else None
        self.masked_region_token = nn.Embedding(1, hidden_size) if region_token else None
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size) if max_position_embeddings else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size) if type_vocab_size else None
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps) if normalize else None
        self.dropout = Dropout(dropout) if normalize else None
        init_bert_weights(self, initializer_range)
        self.visual_region = VisualTerm(visual_size, hidden_size, True, 0.0, layer_norm_eps) if visual_term else None
        self.segment = segment

    def forward(self, region_visual: Tensor, masked_regions: Optional[Tensor] = None) -> Tensor:
        vectors = _region_token_terms(self, region_visual, masked_regions)
        if self.position_embeddings is not None:
            vectors = vectors + self.position_embeddings.weight[0]
        if self.token_type_embeddings is not None:
            vectors = vectors + self.token_type_embeddings.weight[self.segment]
        if self.LayerNorm is None:
            return vectors
        return self.dropout(self.LayerNorm(vectors))


class VLEmbedding(nn.Module):
    """Text and region embeddings in one sequence: VL-BERT's packing by default, VisualBERT's
    concatenation by options.

    With the defaults (VL-BERT) each row becomes `[valid text][valid regions][END][padding]`. A
    text token's embedding is `word + visual_text(v)` where v is the feature of the region the
    token looks at (region 0, the whole image, unless grounded). A region's is `[IMG] +
    visual_region(feature)`, with the learned masked-region token in place of [IMG] where the
    region is masked. [END] is a learned vector alone. Segments: text as given, regions and [END]
    = 2, padding 0. Positions: text 0..n-1, every region n, [END] n+1, padding its slot index.
    Then LayerNorm and dropout. Padding slots hold zeros before the LayerNorm and are masked out
    of attention.

    The options turn each VL-BERT specific off: `layout="concatenated"` keeps the padded text
    and the padded regions side by side (`[text incl. padding][regions incl. padding]`, text
    positions 0..L-1, no [END]: set `end_token=False`; every slot the key mask allows is a
    real token or region), `end_token=False` drops [END], `text_visual_term=False` the
    text's visual term, `region_token=False` the [IMG] / masked-region tokens,
    `region_visual_term=False` the regions' `VisualTerm` (the region feature, already H wide, is
    added as is), `region_positions="zero"` puts every region at position 0, and
    `separate_region_tables=True` reads the regions' position and segment from their own tables
    (`visual_position_embeddings`, `visual_token_type_embeddings`). VisualBERT is
    `layout="concatenated", end_token=False, text_visual_term=False, region_token=False,
    region_visual_term=False, region_positions="zero", separate_region_tables=True, region_segment=1`.
    The LayerNorm and dropout are shared by the whole sequence.

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
        layer_norm_eps: epsilon of every LayerNorm.
        dropout: dropout after the LayerNorm.
        initializer_range: std of the normal initialisation.
        region_visual_scale_init: a different initial value for the regions' visual term.
        layout, end_token, text_visual_term, region_token, region_visual_term, region_positions,
            separate_region_tables: see above.
        region_segment: the regions' (and [END]'s) segment id.

    Inputs:
        text_ids: [B, L] long.
        segment_ids: [B, L] long.
        text_mask: [B, L] bool.
        text_visual: [B, L, visual_size] region feature seen by each token (unused without a text visual term).
        region_visual: [B, N, visual_size] feature of each region (N may be 0).
        region_mask: [B, N] bool.
        masked_regions: [B, N] bool or None.
        sequence_length: T, the packed length, when the caller counted it (`VLBatch.packed_length`);
            None counts it here, which waits for the device. Unused when concatenated.

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
        layout: Literal["packed", "concatenated"] = "packed",
        end_token: bool = True,
        text_visual_term: bool = True,
        region_token: bool = True,
        region_visual_term: bool = True,
        region_positions: RegionPositions = "after_text",
        separate_region_tables: bool = False,
        region_segment: int = VISUAL_SEGMENT,
    ) -> None:
        super().__init__()
        if layout not in ("packed", "concatenated"):
            raise ValueError(f"layout must be 'packed' or 'concatenated', not {layout!r}")
        if region_positions not in ("after_text", "zero"):
            raise ValueError(f"region_positions must be 'after_text' or 'zero', not {region_positions!r}")
        if layout == "concatenated" and end_token:
            raise ValueError("the concatenated layout has no [END] token: set end_token=False")
        if separate_region_tables and layout != "concatenated":
            raise ValueError("separate region position / segment tables need layout='concatenated'")
        if not region_visual_term and visual_size != hidden_size:
            raise ValueError(f"without a region visual term the region features must be hidden_size ({hidden_size}) wide, not {visual_size}")
        self.word_embeddings = WordEmbedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        # The creation order fixes the random initialisation; it is VL-BERT's from the first release.
        self.end_embedding = nn.Embedding(1, hidden_size) if end_token else None
        self.image_token = nn.Embedding(1, hidden_size) if region_token else None
        self.masked_region_token = nn.Embedding(1, hidden_size) if region_token else None
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)
        if separate_region_tables:
            self.visual_token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
            self.visual_position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        init_bert_weights(self, initializer_range)
        self.visual_text = (
            VisualTerm(visual_size, hidden_size, visual_layer_norm, visual_scale_init, layer_norm_eps) if text_visual_term else None
        )
        region_scale = visual_scale_init if region_visual_scale_init is None else region_visual_scale_init
        self.visual_region = (
            VisualTerm(visual_size, hidden_size, visual_layer_norm, region_scale, layer_norm_eps) if region_visual_term else None
        )
        for term in (self.visual_text, self.visual_region):
            if term is not None and term.projection is not None:
                init_bert_weights(term.projection, initializer_range)
        self.hidden_size = hidden_size
        self.visual_size = visual_size
        self.layout = layout
        self.region_positions = region_positions
        self.separate_region_tables = separate_region_tables
        self.region_segment = region_segment

    def forward(
        self,
        text_ids: Tensor,
        segment_ids: Tensor,
        text_mask: Tensor,
        text_visual: Optional[Tensor],
        region_visual: Tensor,
        region_mask: Tensor,
        masked_regions: Optional[Tensor] = None,
        sequence_length: Optional[int] = None,
    ) -> VLEmbeddingOutput:
        text_mask, region_mask = text_mask.bool(), region_mask.bool()
        region_vectors = _region_token_terms(self, region_visual, masked_regions)
        if self.layout == "concatenated":
            return self._concatenated(text_ids, segment_ids, text_mask, text_visual, region_vectors, region_mask)
        return self._packed(text_ids, segment_ids, text_mask, text_visual, region_vectors, region_mask, sequence_length)

    def _packed(
        self,
        text_ids: Tensor,
        segment_ids: Tensor,
        text_mask: Tensor,
        text_visual: Optional[Tensor],
        region_vectors: Tensor,
        region_mask: Tensor,
        sequence_length: Optional[int],
    ) -> VLEmbeddingOutput:
        batch, device = text_ids.shape[0], text_ids.device
        text_vectors = self.word_embeddings(text_ids)
        if self.visual_text is not None:
            text_vectors = text_vectors + self.visual_text(text_visual)
        text_count = text_mask.sum(1)
        region_count = region_mask.sum(1)
        end_slot = text_count + region_count  # [B]: [END]'s slot, or the first padding slot without it
        if sequence_length is None:  # a batch's own count (`VLBatch.packed_length`) includes [END]
            extra = 1 if self.end_embedding is not None else 0
            sequence_length = max(int(end_slot.max().item()) + extra, 1) if batch > 0 else 1
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
        if self.end_embedding is not None:
            rows = torch.arange(batch, device=device)
            packed = packed.index_put((rows, end_slot), self.end_embedding.weight[0].expand(batch, -1).to(packed.dtype))
        packed = packed[:, :length]
        text_slots = text_slots.masked_fill(~text_mask, -1)
        region_slots = region_slots.masked_fill(~region_mask, -1)

        slot = torch.arange(length, device=device).expand(batch, length)
        last_visual = end_slot if self.end_embedding is not None else end_slot - 1
        is_visual = (slot >= text_count[:, None]) & (slot <= last_visual[:, None])
        packed_segments = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
        packed_segments = packed_segments.index_put((rows_text, text_slots.masked_fill(~text_mask, length)), segment_ids)[:, :length]
        packed_segments = packed_segments.masked_fill(is_visual, self.region_segment)
        region_position = text_count[:, None] if self.region_positions == "after_text" else torch.zeros_like(text_count[:, None])
        positions = torch.where(is_visual, region_position, slot.clone())
        if self.end_embedding is not None:
            positions = torch.where(slot == end_slot[:, None], text_count[:, None] + 1, positions)
        attention_mask = slot <= last_visual[:, None]

        embeddings = packed + self.position_embeddings(positions) + self.token_type_embeddings(packed_segments)
        embeddings = self.dropout(self.LayerNorm(embeddings))
        return VLEmbeddingOutput(embeddings, attention_mask, text_slots, region_slots, positions, packed_segments)

    def _concatenated(
        self,
        text_ids: Tensor,
        segment_ids: Tensor,
        text_mask: Tensor,
        text_visual: Optional[Tensor],
        region_vectors: Tensor,
        region_mask: Tensor,
    ) -> VLEmbeddingOutput:
        (batch, text_length), regions, device = text_ids.shape, region_mask.shape[1], text_ids.device
        text_positions = torch.arange(text_length, device=device).expand(batch, text_length)
        text_vectors = _text_terms(self, text_ids, segment_ids, text_positions, text_visual)
        region_segments = torch.full((batch, regions), self.region_segment, dtype=torch.long, device=device)
        if self.region_positions == "zero":
            region_positions = torch.zeros(batch, regions, dtype=torch.long, device=device)
        else:
            region_positions = text_mask.sum(1, keepdim=True).expand(batch, regions)
        positions_table = self.visual_position_embeddings if self.separate_region_tables else self.position_embeddings
        segments_table = self.visual_token_type_embeddings if self.separate_region_tables else self.token_type_embeddings
        region_vectors = region_vectors.to(text_vectors.dtype) + positions_table(region_positions) + segments_table(region_segments)
        embeddings = self.dropout(self.LayerNorm(torch.cat([text_vectors, region_vectors], dim=1)))
        text_slots = torch.where(text_mask, text_positions, -1)
        region_slots = torch.where(region_mask, text_length + torch.arange(regions, device=device), -1)
        return VLEmbeddingOutput(
            embeddings,
            torch.cat([text_mask, region_mask], dim=1),
            text_slots,
            region_slots,
            torch.cat([text_positions, region_positions], dim=1),
            torch.cat([segment_ids, region_segments], dim=1),
        )
