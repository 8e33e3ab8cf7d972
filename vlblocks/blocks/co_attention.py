"""A two-stream co-attention encoder (LXMERT): language layers, region layers, then cross-modality layers."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn

from vlblocks.blocks.encoder import Attention, Intermediate, ResidualLayerNorm, TransformerLayer
from vlblocks.blocks.initialization import init_bert_weights


class TwoStreamEncoderOutput(NamedTuple):
    """What `CoAttentionEncoder` returns.

    Attributes:
        text: [B, L, H] the language stream after the last layer.
        regions: [B, N, H] the region stream after the last layer.
        text_hidden_states: the language stream after each language and cross-modality layer
            (not the input), [B, L, H] each, when asked (transformers' `language_hidden_states`).
        region_hidden_states: the region stream after each region and cross-modality layer,
            [B, N, H] each, when asked (`vision_hidden_states`).
        text_attentions: [B, heads, L, L] per language layer, when asked.
        region_attentions: [B, heads, N, N] per region layer, when asked.
        cross_attentions: [B, heads, L, N] per cross-modality layer (language over regions), when asked.
    """

    text: Tensor
    regions: Tensor
    text_hidden_states: Optional[tuple[Tensor, ...]] = None
    region_hidden_states: Optional[tuple[Tensor, ...]] = None
    text_attentions: Optional[tuple[Tensor, ...]] = None
    region_attentions: Optional[tuple[Tensor, ...]] = None
    cross_attentions: Optional[tuple[Tensor, ...]] = None


class CrossModalityLayer(nn.Module):
    """One LXMERT cross-modality layer, from the single-stream encoder's blocks.

    1. Each stream attends over the other with one shared cross-attention (`cross_attention`,
       an `Attention` given the other stream as context), both from the layer's input.
    2. Each stream attends over itself (`text_attention`, `region_attention`).
    3. Each stream's feed-forward block (`text_intermediate` + `text_output`, `region_...`).

    Inputs: text [B, L, H], text_mask [B, L] bool, regions [B, N, H], region_mask [B, N] bool.
    Returns: text [B, L, H], regions [B, N, H], and the language-over-regions probabilities
        [B, heads, L, N] when asked (else None).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attention_dropout: float, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.cross_attention = Attention(hidden_size, num_heads, dropout, attention_dropout, layer_norm_eps)
        self.text_attention = Attention(hidden_size, num_heads, dropout, attention_dropout, layer_norm_eps)
        self.region_attention = Attention(hidden_size, num_heads, dropout, attention_dropout, layer_norm_eps)
        self.text_intermediate = Intermediate(hidden_size, intermediate_size)
        self.text_output = ResidualLayerNorm(intermediate_size, hidden_size, dropout, layer_norm_eps)
        self.region_intermediate = Intermediate(hidden_size, intermediate_size)
        self.region_output = ResidualLayerNorm(intermediate_size, hidden_size, dropout, layer_norm_eps)

    def forward(
        self, text: Tensor, text_mask: Tensor, regions: Tensor, region_mask: Tensor, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        text_crossed, probabilities = self.cross_attention(text, region_mask, output_attentions, context=regions, allow_empty=True)
        regions_crossed, _ = self.cross_attention(regions, text_mask, False, context=text, allow_empty=True)
        text_attended, _ = self.text_attention(text_crossed, text_mask, allow_empty=True)
        regions_attended, _ = self.region_attention(regions_crossed, region_mask, allow_empty=True)
        text_out = self.text_output(self.text_intermediate(text_attended), text_attended)
        regions_out = self.region_output(self.region_intermediate(regions_attended), regions_attended)
        return text_out, regions_out, probabilities


class CoAttentionEncoder(nn.Module):
    """Two streams: `text_layers` over the language, `region_layers` over the regions (both
    `TransformerLayer`s, as in the single-stream encoder), then `cross_layers`
    `CrossModalityLayer`s that exchange information. LXMERT uses 9 / 5 / 5.

    A row may hold no valid region (or no valid token): attention over an empty stream gives 0.

    Args:
        text_layers, region_layers, cross_layers: layer counts.
        hidden_size, num_heads, intermediate_size, dropout, attention_dropout, layer_norm_eps:
            as `TransformerEncoder`.
        initializer_range: std of the normal initialisation.

    Inputs:
        text: [B, L, H] embedded language. text_mask: [B, L] bool.
        regions: [B, N, H] embedded regions. region_mask: [B, N] bool.
        output_hidden_states, output_attentions: also return per-layer states / probabilities.

    Returns:
        `TwoStreamEncoderOutput`.
    """

    def __init__(
        self,
        text_layers: int = 9,
        region_layers: int = 5,
        cross_layers: int = 5,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        sizes = (hidden_size, num_heads, intermediate_size, dropout, attention_dropout, layer_norm_eps)
        self.text_layer = nn.ModuleList(TransformerLayer(*sizes) for _ in range(text_layers))
        self.region_layer = nn.ModuleList(TransformerLayer(*sizes) for _ in range(region_layers))
        self.cross_layer = nn.ModuleList(CrossModalityLayer(*sizes) for _ in range(cross_layers))
        init_bert_weights(self, initializer_range)

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        regions: Tensor,
        region_mask: Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> TwoStreamEncoderOutput:
        text_states: list[Tensor] = []
        region_states: list[Tensor] = []
        text_probabilities: list[Tensor] = []
        region_probabilities: list[Tensor] = []
        cross_probabilities: list[Tensor] = []
        for layer in self.text_layer:
            text, probabilities = layer(text, text_mask, output_attentions, allow_empty=True)
            text_states.append(text)
            text_probabilities.append(probabilities)
        for layer in self.region_layer:
            regions, probabilities = layer(regions, region_mask, output_attentions, allow_empty=True)
            region_states.append(regions)
            region_probabilities.append(probabilities)
        for layer in self.cross_layer:
            text, regions, probabilities = layer(text, text_mask, regions, region_mask, output_attentions)
            text_states.append(text)
            region_states.append(regions)
            cross_probabilities.append(probabilities)
        if not output_hidden_states:
            text_states = region_states = None
        if not output_attentions:
            text_probabilities = region_probabilities = cross_probabilities = None

        def as_tuple(items: Optional[list[Tensor]]) -> Optional[tuple[Tensor, ...]]:
            return tuple(items) if items is not None else None

        return TwoStreamEncoderOutput(
            text,
            regions,
            as_tuple(text_states),
            as_tuple(region_states),
            as_tuple(text_probabilities),
            as_tuple(region_probabilities),
            as_tuple(cross_probabilities),
        )
