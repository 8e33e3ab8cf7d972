"""A BERT-style (post-LayerNorm) Transformer encoder with the parameter names of HF `BertEncoder`."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlblocks.blocks.dropout import Dropout
from vlblocks.blocks.initialization import init_bert_weights
from vlblocks.blocks.normalization import LayerNorm


class EncoderOutput(NamedTuple):
    """`last_hidden_state` [B, T, H]; `hidden_states`: embeddings then each layer's output,
    [B, T, H] each (only when asked); `attentions`: [B, heads, T, T] per layer (only when asked)."""

    last_hidden_state: Tensor
    hidden_states: Optional[tuple[Tensor, ...]] = None
    attentions: Optional[tuple[Tensor, ...]] = None


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention of a query stream over a key/value stream
    (`query`, `key`, `value` projections); self-attention when no context is given.

    Args:
        hidden_size: size of the query stream (and of the output).
        num_heads: attention heads.
        dropout: dropout on the attention probabilities.
        context_size: size of the key/value stream; default `hidden_size`.

    Inputs:
        hidden: [B, Tq, H] the query stream.
        attention_mask: [B, Tk] bool, True at keys that may be attended (the key/value stream's mask).
        output_attentions: also return the probabilities (computed explicitly, not by SDPA).
        context: [B, Tk, C] the key/value stream; None attends over `hidden` itself.
        allow_empty: a row may have no key to attend (a two-stream row without regions): its
            context is then 0 (and its probabilities 0) instead of NaN.

    Returns:
        context [B, Tq, H] and probabilities [B, heads, Tq, Tk] or None.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, context_size: Optional[int] = None) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        context_size = hidden_size if context_size is None else context_size
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_size, hidden_size)
        self.value = nn.Linear(context_size, hidden_size)
        self.dropout_p = dropout

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        output_attentions: bool = False,
        context: Optional[Tensor] = None,
        allow_empty: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        context = hidden if context is None else context
        q = rearrange(self.query(hidden), "b t (h d) -> b h t d", h=self.num_heads)
        k, v = (rearrange(projection(context), "b t (h d) -> b h t d", h=self.num_heads) for projection in (self.key, self.value))
        key_mask = attention_mask[:, None, None, :].bool()
        has_key = None
        if allow_empty:  # an empty row attends everywhere (no NaN), and its result is zeroed below
            has_key = key_mask.any(-1, keepdim=True)
            key_mask = key_mask | ~has_key
        dropout_p = self.dropout_p if self.training else 0.0
        if output_attentions or sdpa_computes_in_float32(q, dropout_p):
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            probabilities = scores.masked_fill(~key_mask, float("-inf")).softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
            if has_key is not None:
                probabilities = probabilities * has_key.to(probabilities.dtype)
            attended = F.dropout(probabilities, dropout_p, self.training).to(v.dtype) @ v
        else:
            probabilities = None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
            if has_key is not None:
                attended = attended * has_key.to(attended.dtype)
        return rearrange(attended, "b h t d -> b t (h d)"), probabilities


def sdpa_computes_in_float32(q: Tensor, dropout_p: float) -> bool:
    """Whether `F.scaled_dot_product_attention` would take its math path in float32: bf16 or fp16
    inputs on a CPU with dropout (its fused CPU kernel drops nothing, and its math path upcasts
    them). Written out, the attention keeps the matmuls in `q`'s dtype and the softmax in
    float32: a BASE attention's forward and backward in bf16 took 12.6 ms against SDPA's 16.7 on
    a 2-core CPU (docs/performance.md)."""
    return dropout_p > 0 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


class ResidualLayerNorm(nn.Module):
    """`LayerNorm(residual + Dropout(dense(x)))`: the post-LN sublayer output (`dense`, `LayerNorm`)."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class Attention(nn.Module):
    """Attention followed by its residual output (`self`, `output`): self-attention, or the
    cross-attention of a query stream over a `context` stream (`MultiHeadAttention`'s inputs).

    Returns: [B, Tq, H] states and the probabilities or None."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attention_dropout: float, eps: float) -> None:
        super().__init__()
        self.self = MultiHeadAttention(hidden_size, num_heads, attention_dropout)
        self.output = ResidualLayerNorm(hidden_size, hidden_size, dropout, eps)

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        output_attentions: bool = False,
        context: Optional[Tensor] = None,
        allow_empty: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        attended, probabilities = self.self(hidden, attention_mask, output_attentions, context, allow_empty)
        return self.output(attended, hidden), probabilities


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

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        output_attentions: bool = False,
        allow_empty: bool = False,
        rows: Optional[Tensor] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """hidden [B, T, H] → [B, T, H] (or [B, R, H] at `rows`, [B, R] slots: those rows' queries
        over every key, the layer's exact outputs there) and the probabilities or None."""
        if rows is None:
            attended, probabilities = self.attention(hidden, attention_mask, output_attentions, allow_empty=allow_empty)
        else:
            queries = gather_rows(hidden, rows)
            attended, probabilities = self.attention(queries, attention_mask, output_attentions, context=hidden, allow_empty=allow_empty)
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
        last_layer_rows: [B, R] long, distinct slots of each row: the last layer computes only
            these positions' states (their queries over every key and value), which equal the
            full layer's there; `last_hidden_state` holds 0 at every other position. For a caller
            that reads a few final states (pre-training scores about 15% of them). Not with
            `output_attentions`.

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
        last_layer_rows: Optional[Tensor] = None,
    ) -> EncoderOutput:
        if last_layer_rows is not None and output_attentions:
            raise ValueError("last_layer_rows leaves the last layer's attention incomplete: ask for attentions without it")
        all_states = [hidden] if output_hidden_states else None
        all_probabilities = [] if output_attentions else None
        last = len(self.layer) - 1
        for index, layer in enumerate(self.layer):
            if index == last and last_layer_rows is not None:
                computed, probabilities = layer(hidden, attention_mask, rows=last_layer_rows)
                hidden = scatter_rows(computed, last_layer_rows, hidden.shape[1])
            else:
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


def gather_rows(sequence: Tensor, rows: Tensor) -> Tensor:
    """[B, T, H] at [B, R] slots → [B, R, H]."""
    return torch.gather(sequence, 1, rows.unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))


def scatter_rows(states: Tensor, rows: Tensor, length: int) -> Tensor:
    """[B, R, H] states put at their [B, R] distinct slots of a [B, length, H] sequence of zeros."""
    index = rows.unsqueeze(-1).expand(-1, -1, states.shape[-1])
    return states.new_zeros(states.shape[0], length, states.shape[-1]).scatter(1, index, states)


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
