"""Fine-tuning heads: VQA answers, multiple-choice scores, per-region scores.

Parameter names follow the official task modules after their `final_mlp.<i>` prefixes are read
as names: `transform` (the pre-trained head transform it starts from), `classifier`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from vlblocks.blocks.dropout import Dropout
from vlblocks.blocks.heads import HeadTransform
from vlblocks.blocks.initialization import init_bert_weights


def init_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in `module`: how the official
    task modules start their `final_mlp` (pre-trained transforms are loaded over it later)."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            nn.init.zeros_(child.bias)


class AnswerHead(nn.Module):
    """VQA's `mlm` classifier: `transform` (dense + GELU + LayerNorm, as BERT's MLM head) →
    dropout → `classifier` Linear(H, A).

    Args:
        hidden_size: H. num_answers: A (3129 for VQA v2). dropout: 0.1 in VL-BERT.
        layer_norm_eps: as the encoder's.

    Inputs: [B, H] states of the answer slot. Returns: [B, A] logits.
    """

    def __init__(self, hidden_size: int = 768, num_answers: int = 3129, dropout: float = 0.1, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = HeadTransform(hidden_size, True, layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_answers)
        init_xavier(self)

    @torch.no_grad()
    def init_from_word_embeddings(self, word_embeddings: Tensor, answer_pieces: Sequence[Sequence[int]]) -> None:
        """Start each answer's classifier row at the mean word embedding of its word pieces
        (VL-BERT's `CLASSIFIER_PRETRAINED`); answers with no pieces keep their row.

        Args:
            word_embeddings: [V, H]. answer_pieces: A lists of word-piece ids.
        """
        if len(answer_pieces) != self.classifier.out_features:
            raise ValueError(f"{len(answer_pieces)} answers for a classifier of {self.classifier.out_features}")
        for row, pieces in enumerate(answer_pieces):
            if pieces:
                self.classifier.weight[row] = word_embeddings[torch.as_tensor(list(pieces))].mean(0)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.transform(hidden)))


class ChoiceHead(nn.Module):
    """Multiple-choice score (VCR's `1fc`): dropout → `classifier` Linear(H, 1) on the pooled output.

    Inputs: [B, H]. Returns: [B] logits.
    """

    def __init__(self, hidden_size: int = 768, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, 1)
        init_xavier(self)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(self.dropout(pooled)).squeeze(-1)


class RegionScoreHead(nn.Module):
    """Per-region outputs: `transform` (dense + GELU, the masked-region head's) → dropout →
    `classifier` Linear(H, outputs). RefCOCO+ scores each region (outputs 1); VCR's auxiliary
    loss classifies each region into the 81 COCO classes.

    Args:
        hidden_size: H. outputs: 1 (a score, squeezed) or C classes. dropout: 0 in VL-BERT.
        xavier: start the Linears as the official `final_mlp` (True, RefCOCO+), or with BERT's
            normal initialisation (False, VCR's `cnn_loss_reg`).
        initializer_range: std of the normal initialisation.

    Inputs: [B, N, H] region states. Returns: [B, N] scores, or [B, N, C] logits.
    """

    def __init__(
        self, hidden_size: int = 768, outputs: int = 1, dropout: float = 0.0, xavier: bool = True,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.transform = HeadTransform(hidden_size, layer_norm=False)
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, outputs)
        if xavier:
            init_xavier(self)
        else:
            init_bert_weights(self, initializer_range)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.classifier(self.dropout(self.transform(hidden)))
        return logits.squeeze(-1) if self.classifier.out_features == 1 else logits
