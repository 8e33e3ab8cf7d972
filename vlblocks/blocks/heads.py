"""Pre-training heads: masked words, masked regions, and caption-image relation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlblocks.blocks.initialization import init_bert_weights
from vlblocks.blocks.normalization import LayerNorm
from vlblocks.blocks.word_embedding import WordEmbedding


def select_rows(hidden: Tensor, select: Optional[Tensor]) -> Tensor:
    """[B, L, H] states → all of them, or the [K, H] selected by `select`: [K, 2] (row, position)
    indices (a gather of known size, nothing waits for the device) or a [B, L] bool mask."""
    if select is None:
        return hidden
    if select.dtype == torch.bool:
        return hidden[select]
    return hidden[select[:, 0], select[:, 1]]


class HeadTransform(nn.Module):
    """`dense` → erf GELU → optional `LayerNorm`: BERT's prediction-head transform.

    Inputs: [..., H]. Returns: [..., H].
    """

    def __init__(self, hidden_size: int, layer_norm: bool = True, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps) if layer_norm else None

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = F.gelu(self.dense(hidden))
        return self.LayerNorm(hidden) if self.LayerNorm is not None else hidden


class MaskedLMHead(nn.Module):
    """Word prediction with the decoder tied to the word embeddings (BERT's MLM head).

    Scoring only the selected (masked) positions avoids the vocabulary projection everywhere
    else, which is where VL-BERT computes its loss anyway.

    Args:
        hidden_size: H. vocab_size: V. layer_norm_eps: transform LayerNorm epsilon.
        initializer_range: std of the normal initialisation.

    Call `tie_to(word_embeddings)` (the model does) to share the decoder weight. Tied to a
    `WordEmbedding`, the decoder multiplies by its `decoder_weight()`, so that inside the table's
    `one_gradient()` both uses of the table get one gradient buffer.

    Inputs:
        hidden: [B, L, H].
        select: [K, 2] (row, token) positions, [B, L] bool, or None (`select_rows`).

    Returns:
        [B, L, V] logits, or [K, V] for the K selected positions.
    """

    def __init__(
        self, hidden_size: int = 768, vocab_size: int = 30522, layer_norm_eps: float = 1e-12, initializer_range: float = 0.02
    ) -> None:
        super().__init__()
        self.transform = HeadTransform(hidden_size, True, layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self._tied_words: tuple[nn.Embedding, ...] = ()  # a tuple, so the table is not registered twice as a submodule
        init_bert_weights(self, initializer_range)

    def tie_to(self, word_embeddings: nn.Embedding) -> None:
        if word_embeddings.weight.shape != self.decoder.weight.shape:
            raise ValueError(
                f"cannot tie a decoder of shape {tuple(self.decoder.weight.shape)} "
                f"to word embeddings of shape {tuple(word_embeddings.weight.shape)}"
            )
        self.decoder.weight = word_embeddings.weight
        self._tied_words = (word_embeddings,)

    def decoder_weight(self) -> Tensor:
        """[V, H]: the decoder's weight, through the tied `WordEmbedding` while it is still the same parameter."""
        words = self._tied_words[0] if self._tied_words else None
        if isinstance(words, WordEmbedding) and words.weight is self.decoder.weight:
            return words.decoder_weight()
        return self.decoder.weight

    def forward(self, hidden: Tensor, select: Optional[Tensor] = None) -> Tensor:
        states = self.transform(select_rows(hidden, select))
        weight = self.decoder_weight()
        # Calling the module where the weight is its own keeps its hooks (and `describe`'s row for it).
        return (self.decoder(states) if weight is self.decoder.weight else F.linear(states, weight)) + self.bias


class MaskedRegionHead(nn.Module):
    """Region classification: `transform` (dense + GELU, no LayerNorm) → `region_cls_pred`.

    Args:
        hidden_size: H. num_classes: 1601 (background + 1600 Visual Genome classes).

    Inputs:
        hidden: [B, N, H] region states. select: [K, 2] (row, region) positions, [B, N] bool or None.

    Returns:
        [B, N, num_classes] logits, or [K, num_classes] for the selected regions.
    """

    def __init__(self, hidden_size: int = 768, num_classes: int = 1601, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.transform = HeadTransform(hidden_size, layer_norm=False)
        self.region_cls_pred = nn.Linear(hidden_size, num_classes)
        init_bert_weights(self, initializer_range)

    def forward(self, hidden: Tensor, select: Optional[Tensor] = None) -> Tensor:
        return self.region_cls_pred(self.transform(select_rows(hidden, select)))


class RelationHead(nn.Module):
    """Caption-image relation: `classifier` Linear(H, 2) on the pooled output.

    Inputs: pooled [B, H]. Returns: [B, 2] logits; the label convention is the objective's.
    """

    def __init__(self, hidden_size: int = 768, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 2)
        init_bert_weights(self, initializer_range)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class RegionPredictionHead(nn.Module):
    """Predictions from region states through one shared transform (dense → GELU → LayerNorm)
    and one Linear decoder per output: LXMERT's object labels, attributes and region features.

    Args:
        hidden_size: H.
        outputs: output name → size, e.g. {"object": 1600, "attribute": 400, "feature": 2048}.
        layer_norm_eps: transform LayerNorm epsilon. initializer_range: std of the initialisation.

    Parameters: `transform.dense`, `transform.LayerNorm`, `decoders.<name>`.

    Inputs:
        hidden: [B, N, H] region states. select: [K, 2] (row, region), [B, N] bool or None.

    Returns:
        dict name → [K, size] (or [B, N, size] without `select`).
    """

    def __init__(
        self,
        hidden_size: int = 768,
        outputs: Optional[dict[str, int]] = None,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        outputs = dict(outputs) if outputs is not None else {"object": 1600, "attribute": 400, "feature": 2048}
        self.transform = HeadTransform(hidden_size, True, layer_norm_eps)
        self.decoders = nn.ModuleDict({name: nn.Linear(hidden_size, size) for name, size in outputs.items()})
        init_bert_weights(self, initializer_range)

    def forward(self, hidden: Tensor, select: Optional[Tensor] = None) -> dict[str, Tensor]:
        transformed = self.transform(select_rows(hidden, select))
        return {name: decoder(transformed) for name, decoder in self.decoders.items()}
