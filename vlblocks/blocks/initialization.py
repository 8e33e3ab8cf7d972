"""BERT's weight initialisation, shared by the Transformer-side blocks."""

from __future__ import annotations

from torch import nn


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialise every Linear/Embedding weight from N(0, std), biases to 0, LayerNorms to (1, 0)."""
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Embedding)):
            nn.init.normal_(child.weight, mean=0.0, std=std)
        if isinstance(child, nn.Linear) and child.bias is not None:
            nn.init.zeros_(child.bias)
        if isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
