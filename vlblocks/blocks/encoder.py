"""A BERT-style (post-LayerNorm) Transformer encoder with the parameter names of HF `BertEncoder`."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlblocks.blocks.initialization import init_bert_weights
from vlblocks.blocks.normalization import LayerNorm


class EncoderOutput(NamedTuple):
    """`last_hidden_state` [B, T, H]; `hidden_states`: embeddings then each layer's output,
    [B, T, H] each (only when asked); `attentions`: [B, heads, T, T] per layer (only when asked)."""

    last_hidden_state: Tensor
    hidden_states: Optional[tuple[Tensor, ...]] = None
    attentions: Optional[tuple[Tensor, ...]] = None


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (`query`, `key`, `value` projections).

    Inputs:
        hidden: [B, T, H].
        attention_mask: [B, T] bool, True at keys that may be attended.
        output_attentions: also return the probabilities (computed explicitly, not by SDPA).

    Returns:
        context [B, T, H] and probabilities [B, heads, T, T] or None.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_p = dropout

    def forward(
        self, hidden: Tensor, attention_mask: Tensor, output_attentions: bool = False
    ) -> tuple[Tensor, Optional[Tensor]]:
        q, k, v = (
            rearrange(projection(hidden), "b t (h d) -> b h t d", h=self.num_heads)
            for projection in (self.query, self.key, self.value)
        )
        key_mask = attention_mask[:, None, None, :].bool()
        dropout_p = self.dropout_p if self.training else 0.0
        if output_attentions:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            probabilities = scores.masked_fill(~key_mask, float("-inf")).softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
            context = F.dropout(probabilities, dropout_p, self.training) @ v
        else:
            probabilities = None
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        return rearrange(context, "b h t d -> b t (h d)"), probabilities


class ResidualLayerNorm(nn.Module):
    """`LayerNorm(residual + Dropout(dense(x)))`: the post-LN sublayer output (`dense`, `LayerNorm`)."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class Attention(nn.Module):
    """Self-attention followed by its residual output (`self`, `output`)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attention_dropout: float, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden_size, num_heads, attention_dropout)
        self.output = ResidualLayerNorm(hidden_size, hidden_size, dropout, eps)

    def forward(self, hidden: Tensor, attention_mask: Tensor, output_attentions: bool) -> tuple[Tensor, Optional[Tensor]]:
        context, probabilities = self.self(hidden, attention_mask, output_attentions)
        return self.output(context, hidden), probabilities


class Intermediate(nn.Module):
    """`gelu(dense(x))` with the exact (erf) GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden))


class TransformerLayer(nn.Module):
    """One post-LN Transformer layer: attention, then the feed-forward block, each with a residual."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float,
        attention_dropout: float,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.attention = Attention(hidden_size, num_heads, dropout, attention_dropout, layer_norm_eps)
        self.intermediate = Intermediate(hidden_size, intermediate_size)
        self.output = ResidualLayerNorm(intermediate_size, hidden_size, dropout, layer_norm_eps)

    def forward(self, hidden: Tensor, attention_mask: Tensor, output_attentions: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        attended, probabilities = self.attention(hidden, attention_mask, output_attentions)
        return self.output(self.intermediate(attended), attended), probabilities


class TransformerEncoder(nn.Module):
    """A stack of post-LN Transformer layers over one fused text+region sequence.

    Parameter names equal HF `BertEncoder`'s (`layer.{i}.attention.self.query.weight`, ...), so
    BERT weights load by name. Attention uses `scaled_dot_product_attention` unless
    probabilities are requested.

    Args:
        num_layers, hidden_size, num_heads, intermediate_size: the usual BERT sizes.
        dropout: hidden dropout. attention_dropout: dropout on attention probabilities.
        layer_norm_eps: LayerNorm epsilon (1e-12 in BERT).
        initializer_range: std of the normal initialisation.

    Inputs:
        hidden: [B, T, H].
        attention_mask: [B, T] bool, True at positions that may be attended.
        output_hidden_states, output_attentions: also return per-layer states / probabilities.

    Returns:
        `EncoderOutput`.
    """

    def __init__(
        self,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            TransformerLayer(hidden_size, num_heads, intermediate_size, dropout, attention_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        init_bert_weights(self, initializer_range)

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        all_states = [hidden] if output_hidden_states else None
        all_probabilities = [] if output_attentions else None
        for layer in self.layer:
            hidden, probabilities = layer(hidden, attention_mask, output_attentions)
            if all_states is not None:
                all_states.append(hidden)
            if all_probabilities is not None:
                all_probabilities.append(probabilities)
        return EncoderOutput(
            hidden,
            tuple(all_states) if all_states is not None else None,
            tuple(all_probabilities) if all_probabilities is not None else None,
        )


class Pooler(nn.Module):
    """`tanh(dense(h[:, 0]))`: the first token's state through a Linear and tanh.

    Inputs: hidden [B, T, H]. Returns: [B, H].
    """

    def __init__(self, hidden_size: int = 768, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        init_bert_weights(self, initializer_range)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))
