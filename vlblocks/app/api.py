"""The Python API: `vlblocks.build` and `vlblocks.train`, the same objects and runs as the command line."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import gin
import torch
from torch import nn

from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import build_model
from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.contracts import Echo
from vlblocks.data.datasets.run_data import RunData
from vlblocks.models.task import Task
from vlblocks.train.loop import Trainer

# A recipe that binds one of these trains something (a task on data); one that binds none only
# defines a model (recipes/models/*.gin).
RUN_BINDINGS = ("PretrainingTask.model", "experiment.task", "experiment.data")


class Run(NamedTuple):
    """What a training recipe assembles: the task (model, heads, loss), its data and the trainer."""

    task: Task
    data: RunData
    trainer: Trainer


def _binds(name: str) -> bool:
    try:
        gin.query_parameter(name)
    except ValueError:
        return False
    return True


def build(recipe: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> nn.Module | Run:
    """What `recipe` (a file or a bundled recipe's name) assembles, with `bindings` over it: a
    `Run` (task, data, trainer: what `vlblocks train` would train) for a training recipe, else
    the model (`build_model.model`, what `vlblocks describe` shows).

    Raises:
        RecipeError: the recipe does not parse or build (the message names file, line, binding).
    """
    parse_recipe(recipe, bindings)
    if any(_binds(name) for name in RUN_BINDINGS):
        return Run(*build_run(recipe, bindings, echo))
    return build_from_recipe(recipe, build_model, echo)


def train(
    recipe: str | Path,
    out: str | Path,
    bindings: Sequence[str] = (),
    max_steps: Optional[int] = None,
    device: str | torch.device = "auto",
    precision: Optional[str] = None,
    resume: bool = False,
    echo: Echo = print,
) -> dict[str, float]:
    """Run what `vlblocks train RECIPE --out OUT` runs (same arguments, same folder) and return
    the validation metrics after training."""
    return train_from_recipe(recipe, bindings, out, max_steps, echo=echo, device=device, precision=precision, resume=resume)
