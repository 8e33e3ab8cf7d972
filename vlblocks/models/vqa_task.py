"""VQA fine-tuning: the answer slot's state → answer classifier, BCE on soft scores."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.blocks.task_heads import AnswerHead
from vlblocks.contracts import Echo
from vlblocks.models.interface import VLModel
from vlblocks.models.task import LossTerm, Task, TaskData, TaskOutput


def vqa_loss(logits: Tensor, scores: Tensor) -> Tensor:
    """VL-BERT's VQA loss: binary cross-entropy with logits, averaged over all B x A entries,
    times A (so each sample contributes its sum over answers, averaged over the batch).

    Inputs: logits, scores: [B, A]. Returns: scalar.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), scores.float()) * scores.shape[1]


def vqa_score(logits: Tensor, scores: Tensor) -> Tensor:
    """[B] the VQA accuracy of each prediction: the soft score of the argmax answer."""
    return scores.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)


class VQATask(Task):
    """VL-BERT for VQA: `[CLS] question [SEP] [MASK] [SEP]`, the [MASK] state → `AnswerHead`.

    Args:
        vlbert: the core model (no pooler in VL-BERT's VQA).
        head: `AnswerHead` with one output per answer of the vocabulary.
        init_classifier_from_words: start each answer's row at the mean word embedding of its
            word pieces (VL-BERT's `CLASSIFIER_PRETRAINED`), done by `fit_to_data`.

    Inputs: batch with `answer_positions` (and `answer_scores` to get a loss).
    Returns: `TaskOutput` whose `model_output` is the [B, A] logits; `vqa/accuracy` is the soft
    VQA accuracy of the argmax answer.
    """

    # Pre-trained checkpoint prefixes (a `PretrainingTask`'s) → this task's.
    pretrained_prefixes = {"model.vlbert.": "vlbert.", "model.mlm_head.transform.": "head.transform."}

    def __init__(self, vlbert: VLModel, head: AnswerHead, init_classifier_from_words: bool = True) -> None:
        super().__init__()
        self.vlbert = vlbert
        self.head = head
        self.init_classifier_from_words = init_classifier_from_words

    def logits(self, batch: VLBatch) -> Tensor:
        if batch.answer_positions is None:
            raise ValueError("a VQA batch needs answer_positions (the [MASK] slot of each row)")
        states = self.vlbert(batch).text_states
        answer_states = states[torch.arange(batch.batch_size, device=states.device), batch.answer_positions]
        return self.head(answer_states)

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        logits = self.logits(batch)
        if batch.answer_scores is None:
            return TaskOutput(logits.sum() * 0.0, {}, logits)
        loss = vqa_loss(logits, batch.answer_scores)
        metrics = {
            "vqa/loss": loss.detach(),
            "vqa/accuracy": vqa_score(logits, batch.answer_scores).mean().detach(),
            "vqa/count": float(batch.batch_size),
            "loss": loss.detach(),
        }
        return TaskOutput(loss, metrics, logits, {"vqa": LossTerm(loss)})

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> dict[str, float]:
        """The loss averages over the questions."""
        return {"vqa": float(batch.batch_size)}

    def fit_to_data(self, data: TaskData, echo: Echo = print) -> None:
        """Check the classifier against the data's answer vocabulary and, if asked, start its
        rows from the answers' word embeddings."""
        answers = data.answers
        if answers is None:
            raise ValueError("VQATask needs data with an answer vocabulary (experiment.data = @vqa_data)")
        if self.head.classifier.out_features != len(answers):
            raise ValueError(
                f"the answer head has {self.head.classifier.out_features} outputs but the answer vocabulary "
                f"has {len(answers)} answers: set AnswerHead.num_answers = {len(answers)}"
            )
        if self.init_classifier_from_words:
            pieces = [data.tokenizer.encode_words(answer.split())[0] for answer in answers]
            self.head.init_from_word_embeddings(self.vlbert.word_embeddings.weight, pieces)
            echo(f"answer classifier rows start at the mean word embedding of each of the {len(answers)} answers")
