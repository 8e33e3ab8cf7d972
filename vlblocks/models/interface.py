"""The one interface every core model offers (single-stream VL-BERT / VisualBERT, two-stream LXMERT)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from vlblocks.batch import VLBatch


class VLOutput(NamedTuple):
    """What a core model returns.

    Attributes:
        text_states: [B, L, H] final state of each input token, zeros at padding.
        region_states: [B, N, H] final state of each input region, zeros at padding.
        pooled: [B, H] pooler output, or None without a pooler.
        sequence_states: [B, T, H] a single-stream model's whole sequence (VL-BERT: text,
            regions, [END], padding packed; VisualBERT: padded text then padded regions); None
            for two streams.
        sequence_mask: [B, T] bool, the sequence's attention mask; None for two streams.
        attentions: when asked: a single-stream model's [B, heads, T, T] per layer; a two-stream
            model's `TwoStreamEncoderOutput` attentions are in `streams`.
        hidden_states: when asked, a single-stream model's sequence after the embedding and
            after each layer, [B, T, H] each.
        streams: a two-stream model's `TwoStreamEncoderOutput` (raw stream states and, when
            asked, per-layer states and attentions); None for one stream.
    """

    text_states: Tensor
    region_states: Tensor
    pooled: Optional[Tensor]
    sequence_states: Optional[Tensor] = None
    sequence_mask: Optional[Tensor] = None
    attentions: Optional[tuple[Tensor, ...]] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None
    streams: Optional[Any] = None


class ScoredPositions(NamedTuple):
    """The final states a caller will read, so that a model may compute only those in its last
    layer (a hint: a model that cannot computes every state).

    Attributes:
        text: [K, 2] long (row, token) of the tokens read, or None.
        regions: [K, 2] long (row, region) of the regions read, or None.
        pooled: whether the pooled output is read.
        per_row: at least the most states one row needs (its tokens and regions, +1 for a
            pooled output), counted on the host: the last layer's row count, known without
            waiting for the device (`VLBatch.scored_length`).
    """

    text: Optional[Tensor]
    regions: Optional[Tensor]
    pooled: bool
    per_row: int


@runtime_checkable
class VLModel(Protocol):
    """What tasks, heads, converters and the run code may use of a core model, whatever its
    blocks: no attribute chains.

    - `model(batch, output_attentions=False, output_hidden_states=False, scored=None)` →
      `VLOutput`; with `scored` (`ScoredPositions`), the states elsewhere may be 0.
    - `region_vectors(batch)` → [B, N, visual_size]: the visual front end alone.
    - `encode(batch, region_visual, text_visual, ..., scored=None)` → `VLOutput` from given
      visual vectors (the text-only stream passes zero regions and a learned stand-in).
    - `word_embeddings`: the [V, H] word table (MLM heads tie to it, VQA heads read it).
    - `segment_embeddings`: the segment table.
    - `visual_size`: the width of the visual vectors `encode` takes.
    """

    word_embeddings: nn.Embedding
    segment_embeddings: nn.Embedding
    visual_size: int

    def __call__(
        self, batch: VLBatch, output_attentions: bool = False, output_hidden_states: bool = False, scored: Optional[ScoredPositions] = None
    ) -> VLOutput: ...

    def region_vectors(self, batch: VLBatch) -> Tensor: ...

    def encode(
        self,
        batch: VLBatch,
        region_visual: Tensor,
        text_visual: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        scored: Optional[ScoredPositions] = None,
    ) -> VLOutput: ...


def region_vectors(region_features: nn.Module, visual_embedding: nn.Module, batch: VLBatch) -> Tensor:
    """[B, N, visual size]: each region's appearance (from `region_features`) embedded with its box
    by `visual_embedding`, 0 at padded regions. Rows that share an image
    (`batch.rows_per_image` > 1) share one pass of the front end."""
    shared = batch.image_rows()
    appearance = region_features(shared)
    vectors = visual_embedding(appearance, shared.boxes, shared.image_sizes, shared.region_mask)
    return vectors.repeat_interleave(batch.rows_per_image, 0) if batch.rows_per_image > 1 else vectors
