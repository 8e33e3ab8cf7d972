"""`vlblocks predict`: a fine-tuned checkpoint over one split of its recipe's data → the file
the task's evaluation server takes, as the official `{vqa,vcr,refcoco}/function/test.py` write
them:

- VQA v2 (EvalAI, test-dev / test-std): `[{"question_id": 1, "answer": "yes"}, ...]`, the answer
  the argmax class's string of the answer vocabulary, written as `json.dump` writes it.
- VCR (leaderboard CSV): `annot_id, answer_0..answer_3, rationale_conditioned_on_a{i}_{j}` with
  the softmax over the 4 choices of the Q→A model, and of the QA→R model given each answer i;
  on a labelled split also the Q→A, QA→R and joint Q→AR accuracy (as `vlblocks eval-vcr-joint`).
- RefCOCO+ (testA / testB / val): `[{"ref_id": 0, "box": [x1, y1, x2, y2]}, ...]` per
  expression, the picked region in the original image's pixels (the resized box divided by the
  resize factors), and the share with a +1-pixel IoU >= 0.5 with the referred box.

The split is the recipe's data builder's validation split, rebound (`vqa_data.val_split`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import gin
import numpy as np
import torch
from torch import Tensor

from vlblocks.app.files import write_text_atomically
from vlblocks.app.recipes import RecipeError, parse_recipe
from vlblocks.app.run import build_run
from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo
from vlblocks.data.datasets.refcoco import RefCocoDataset, box_accuracy
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.datasets.vcr import VCRDataset
from vlblocks.data.datasets.vqa import VQADataset
from vlblocks.models.grounding_task import pick_region
from vlblocks.models.task import Task
from vlblocks.train.checkpoint import load_checkpoint
from vlblocks.train.device import resolve_device
from vlblocks.train.predictions import dataset_outputs
from vlblocks.train.vcr_joint import ChoicePrediction, choice_predictions, joint_accuracy

SPLIT_BUILDERS = ("vqa_data", "vcr_data", "refcoco_data")
VCR_CHOICES = 4
VCR_COLUMNS = (
    "annot_id",
    *(f"answer_{choice}" for choice in range(VCR_CHOICES)),
    *(f"rationale_conditioned_on_a{answer}_{choice}" for answer in range(VCR_CHOICES) for choice in range(VCR_CHOICES)),
)


# ---------------------------------------------------------------------------------------------
# The files


def vqa_results(question_ids: Sequence[int], answer_ids: Sequence[int], answers: Sequence[str]) -> str:
    """EvalAI's VQA v2 results file: `[{"question_id": q, "answer": answers[a]}, ...]` in the
    given order, with `json.dump`'s default separators (the official `vqa/function/test.py`)."""
    return json.dumps([{"question_id": int(q), "answer": answers[int(a)]} for q, a in zip(question_ids, answer_ids)])


def choice_probabilities(logits: Tensor) -> np.ndarray:
    """[Q, 4] logits → [Q, 4] float32 softmax over each question's choices (computed in float32)."""
    return torch.softmax(logits.float(), dim=1).numpy()


def csv_number(value: float) -> str:
    """A float32 probability as the official CSV holds it: pandas writes the float32 frame with
    its shortest float32 digits, `merge_result` reads them back as float64 and writes those."""
    return repr(float(str(np.float32(value))))


def vcr_leaderboard_csv(annot_ids: Sequence[str], answer_probs: np.ndarray, rationale_probs: np.ndarray) -> str:
    """VCR's leaderboard CSV (the official `test_net` + `merge_result`): a header of `VCR_COLUMNS`,
    then per question its `annot_id`, the 4 answer probabilities [Q, 4] and the 16 rationale
    probabilities [Q, 16] (4 given answer 0, then 4 given answer 1, ...); '\\n' line ends."""
    if answer_probs.shape != (len(annot_ids), VCR_CHOICES) or rationale_probs.shape != (len(annot_ids), VCR_CHOICES**2):
        raise ValueError(
            f"{len(annot_ids)} questions need [Q, 4] answer and [Q, 16] rationale probabilities, "
            f"got {answer_probs.shape} and {rationale_probs.shape}"
        )
    lines = [",".join(VCR_COLUMNS)]
    for annot_id, answers, rationales in zip(annot_ids, answer_probs, rationale_probs):
        lines.append(",".join([annot_id, *(csv_number(p) for p in answers), *(csv_number(p) for p in rationales)]))
    return "\n".join(lines) + "\n"


def refcoco_results(ref_ids: Sequence[int], boxes: np.ndarray) -> str:
    """The official RefCOCO results file `[{"ref_id": r, "box": [x1, y1, x2, y2]}, ...]`, one
    entry per expression (a ref with 3 sentences appears 3 times, in sentence order), the boxes
    [E, 4] float32 written as Python floats (`tolist()` then `json.dump`)."""
    return json.dumps([{"ref_id": int(ref_id), "box": box} for ref_id, box in zip(ref_ids, np.asarray(boxes, np.float32).tolist())])


def original_boxes(resized: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, 4] x1, y1, x2, y2 boxes in resized-image pixels divided by their image's [E, 2]
    (x, y) resize factors, in float32 (the official `pred_boxes /= im_info ratios`)."""
    factors = np.asarray(scales, np.float32)[:, [0, 1, 0, 1]]
    return np.asarray(resized, np.float32) / factors


# ---------------------------------------------------------------------------------------------
# Running a checkpoint over a split


def split_binding(recipe: str | Path, bindings: Sequence[str], split: str) -> str:
    """The binding that makes `split` the validation split of the recipe's data builder.

    Raises:
        RecipeError: the recipe's `experiment.data` is not a VQA, VCR or RefCOCO builder.
    """
    parse_recipe(recipe, bindings)
    try:
        builder = gin.query_parameter("experiment.data").selector
    except (ValueError, AttributeError):
        builder = "pretraining_data"
    if builder not in SPLIT_BUILDERS:
        raise RecipeError(f"{recipe}: vlblocks predict writes VQA, VCR and RefCOCO predictions, but the recipe's experiment.data is {builder}")
    return f"{builder}.val_split = {split!r}"


def load_split(
    recipe: str | Path, checkpoint: str | Path, bindings: Sequence[str], split: str, device: torch.device, echo: Echo
) -> tuple[Task, RunData]:
    """The recipe's task with the checkpoint's weights on `device`, and its data with `split` as
    the validation split (`data.val`)."""
    task, data, _ = build_run(recipe, [*bindings, split_binding(recipe, bindings, split)], echo)
    load_checkpoint(task, checkpoint, gin.config_str())
    return task.to(device), data


def predict_vqa(task: Task, data: RunData, batch_size: int) -> tuple[str, dict[str, float]]:
    """The VQA results file of `data.val` (see `vqa_results`)."""
    dataset = data.val
    if data.answers is None:
        raise ValueError("the VQA data has no answer vocabulary")
    answer_ids = dataset_outputs(task, dataset, data.collate, batch_size).argmax(-1).tolist()
    question_ids = [dataset.reader[index].question_id for index in range(len(dataset))]
    return vqa_results(question_ids, answer_ids, data.answers), {"count": float(len(question_ids))}


def picked_boxes(batch: VLBatch, scores: Tensor) -> Tensor:
    """[B, 4] the box of each expression's best-scored real region (`pick_region`)."""
    picked = pick_region(scores, batch.region_mask)
    return batch.boxes[torch.arange(len(picked), device=picked.device), picked].float()


def predict_refcoco(task: Task, data: RunData, batch_size: int) -> tuple[str, dict[str, float]]:
    """The RefCOCO results file of `data.val` and the accuracy against its referred boxes."""
    dataset = data.val
    resized = dataset_outputs(task, dataset, data.collate, batch_size, pick=picked_boxes).numpy()
    expressions = [dataset.reader[index] for index in range(len(dataset))]
    scales = np.asarray([dataset.image_scale(index) for index in range(len(dataset))])
    boxes = original_boxes(resized, scales)
    targets = np.stack([expression.target_box for expression in expressions])
    metrics = {"refcoco/accuracy": box_accuracy(boxes, targets), "count": float(len(expressions))}
    return refcoco_results([expression.ref_id for expression in expressions], boxes), metrics


def predict_vcr(answer: tuple[Task, RunData], rationale: tuple[Task, RunData], batch_size: int) -> tuple[str, dict[str, float]]:
    """The VCR leaderboard CSV of the split both runs read, from the Q→A run and the QA→R run;
    with labels, the Q→A, QA→R and joint accuracy (the QA→R pick then given the right answer)."""
    (answer_task, answer_data), (rationale_task, rationale_data) = answer, rationale
    questions, rationales = answer_data.val, rationale_data.val
    if questions.task != "q2a" or rationales.task != "qa2r":
        raise ValueError(f"VCR predictions need a Q→A recipe and a QA→R recipe, got {questions.task!r} and {rationales.task!r}")
    annot_ids = [questions.reader[index].annot_id for index in range(len(questions))]
    if annot_ids != [rationales.reader[index].annot_id for index in range(len(rationales))]:
        raise ValueError("the Q→A and QA→R recipes read different questions: give both the same data and split")
    answer_logits = dataset_outputs(answer_task, questions, answer_data.collate, batch_size)
    rationale_probs = np.concatenate([
        choice_probabilities(dataset_outputs(rationale_task, rationales.conditioned_on(given), rationale_data.collate, batch_size))
        for given in range(VCR_CHOICES)
    ], axis=1)
    text = vcr_leaderboard_csv(annot_ids, choice_probabilities(answer_logits), rationale_probs)
    labels = [questions.texts(questions.reader[index])[2] for index in range(len(questions))]
    if any(label is None for label in labels):
        return text, {"count": float(len(annot_ids))}
    answers = {key: ChoicePrediction(int(pick), label) for key, pick, label in zip(annot_ids, answer_logits.argmax(-1).tolist(), labels)}
    return text, joint_accuracy(answers, choice_predictions(rationale_task, rationales, rationale_data.collate, batch_size))


def write_atomically(text: str, out: str | Path) -> None:
    """`text` to `out` through a temporary file beside it, so a failure leaves nothing behind."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(text, out)


def predict_from_recipe(
    recipe: str | Path,
    checkpoint: str | Path,
    split: str,
    out: str | Path,
    bindings: Sequence[str] = (),
    batch_size: int = 16,
    device: str | torch.device = "auto",
    echo: Echo = print,
    rationale_recipe: Optional[str | Path] = None,
    rationale_checkpoint: Optional[str | Path] = None,
) -> dict[str, float]:
    """Run `checkpoint` over `split` of its recipe's data and write the evaluation server's file
    to `out` (nothing is written when anything fails); returns the metrics a labelled split
    allows and the count of predictions.

    VCR: `recipe` / `checkpoint` are the Q→A run, `rationale_recipe` / `rationale_checkpoint`
    the QA→R run (both required, both read `split`); other tasks take no rationale model.

    Raises:
        RecipeError, CheckpointError, DataError, FileNotFoundError, ValueError: with the file
            or binding at fault named.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    task, data = load_split(recipe, checkpoint, bindings, split, device, echo)
    has_rationale = rationale_recipe is not None or rationale_checkpoint is not None
    if isinstance(data.val, VCRDataset):
        if rationale_recipe is None or rationale_checkpoint is None:
            raise ValueError(f"{recipe}: VCR's leaderboard file needs the QA→R model too: give --rationale-recipe and --rationale-checkpoint")
        rationale = load_split(rationale_recipe, rationale_checkpoint, bindings, split, device, echo)
        if not isinstance(rationale[1].val, VCRDataset):
            raise ValueError(f"{rationale_recipe}: not a VCR recipe (its data is a {type(rationale[1].val).__name__})")
        text, metrics = predict_vcr((task, data), rationale, batch_size)
    elif has_rationale:
        raise ValueError(f"{recipe}: --rationale-recipe / --rationale-checkpoint are for VCR recipes only")
    elif isinstance(data.val, VQADataset):
        text, metrics = predict_vqa(task, data, batch_size)
    elif isinstance(data.val, RefCocoDataset):
        text, metrics = predict_refcoco(task, data, batch_size)
    else:
        raise ValueError(f"{recipe}: no prediction file for a {type(data.val).__name__}")
    write_atomically(text, out)
    return metrics
