"""`vlblocks eval-vcr-joint`: VCR's Q→AR accuracy from a Q→A and a QA→R checkpoint, each
evaluated on its recipe's validation split (official `vcr/val.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import gin
import torch

from vlblocks.app.run import build_run
from vlblocks.contracts import Echo
from vlblocks.data.datasets.vcr import VCRDataset
from vlblocks.train.checkpoint import load_checkpoint
from vlblocks.train.device import resolve_device
from vlblocks.train.vcr_joint import ChoicePrediction, choice_predictions, joint_accuracy


def recipe_predictions(
    recipe: str | Path, checkpoint: str | Path, bindings: Sequence[str], batch_size: int, device: torch.device, echo: Echo
) -> dict[str, ChoicePrediction]:
    """Per-question picks of one VCR checkpoint on its recipe's validation split."""
    task, data, _ = build_run(recipe, bindings, echo)
    if not isinstance(data.val, VCRDataset):
        raise ValueError(f"{recipe}: not a VCR recipe (its validation split is a {type(data.val).__name__})")
    load_checkpoint(task, checkpoint, gin.config_str())
    task.to(device)
    return choice_predictions(task, data.val, data.collate, batch_size)


def vcr_joint_from_recipes(
    answer_recipe: str | Path,
    answer_checkpoint: str | Path,
    rationale_recipe: str | Path,
    rationale_checkpoint: str | Path,
    bindings: Sequence[str] = (),
    batch_size: int = 16,
    echo: Echo = print,
    device: str | torch.device = "auto",
) -> dict[str, float]:
    """Q→A, QA→R and Q→AR accuracy of the two checkpoints (see `joint_accuracy`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    answers = recipe_predictions(answer_recipe, answer_checkpoint, bindings, batch_size, device, echo)
    rationales = recipe_predictions(rationale_recipe, rationale_checkpoint, bindings, batch_size, device, echo)
    return joint_accuracy(answers, rationales)
