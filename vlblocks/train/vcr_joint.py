"""VCR's joint Q→AR accuracy: a question counts when the Q→A model picks its right answer and
the QA→R model its right rationale (official `vcr/val.py`). The two models are separate runs,
so each one's per-question predictions are collected and the two are joined by `annot_id`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from vlblocks.data.datasets.vcr import VCRDataset
from vlblocks.models.task import Task
from vlblocks.train.predictions import dataset_outputs


@dataclass(frozen=True)
class ChoicePrediction:
    """One question's pick: the index of the best-scored choice and of the right one."""

    predicted: int
    label: Optional[int]


def choice_predictions(task: Task, dataset: VCRDataset, collate, batch_size: int = 16) -> dict[str, ChoicePrediction]:
    """Every question of `dataset` (in order) → its `annot_id` and the task's pick (the argmax
    of the [questions, 4] logits the VCR task returns as `model_output`)."""
    picks = dataset_outputs(task, dataset, collate, batch_size).argmax(-1).tolist()
    predictions = {}
    for index, predicted in enumerate(picks):
        item = dataset.reader[index]
        predictions[item.annot_id] = ChoicePrediction(int(predicted), dataset.texts(item)[2])
    return predictions


def joint_accuracy(answers: Mapping[str, ChoicePrediction], rationales: Mapping[str, ChoicePrediction]) -> dict[str, float]:
    """Q→A, QA→R and Q→AR accuracy over the questions (by `annot_id`) of both maps.

    Q→AR: the share of questions whose answer and rationale are both right.

    Raises:
        ValueError: the two maps cover different questions, or a label is missing.
    """
    if set(answers) != set(rationales):
        only = sorted(set(answers) ^ set(rationales))[:3]
        raise ValueError(f"the Q→A and QA→R predictions cover different questions (e.g. {only})")
    if not answers:
        raise ValueError("no predictions to score")
    unlabelled = [key for key in answers if answers[key].label is None or rationales[key].label is None]
    if unlabelled:
        raise ValueError(f"question {unlabelled[0]!r} has no answer or rationale label (the test split cannot be scored)")
    answer_right = {key: p.predicted == p.label for key, p in answers.items()}
    rationale_right = {key: p.predicted == p.label for key, p in rationales.items()}
    count = len(answers)
    return {
        "q2a/accuracy": sum(answer_right.values()) / count,
        "qa2r/accuracy": sum(rationale_right.values()) / count,
        "q2ar/accuracy": sum(answer_right[key] and rationale_right[key] for key in answers) / count,
        "count": float(count),
    }
