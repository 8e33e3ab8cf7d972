"""A run's folder (`--out`): `recipe.gin`, `metrics.jsonl`, `checkpoints/step-XXXXXXX/` and, when
asked, `tensorboard/`; with length bucketing, `lengths.npy` (the training samples' lengths).

A new run claims a folder that holds no checkpoint (starting its log afresh); a resumed run
continues from the folder's latest complete checkpoint, with the recipe that wrote it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from vlblocks.train.checkpoint import CheckpointError, checkpoint_metadata, recipe_differences, step_folders

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RECIPE = "recipe.gin"
TENSORBOARD = "tensorboard"
LENGTHS = "lengths.npy"


def claim_run_folder(out_dir: str | Path, recipe: str, resume: bool) -> Optional[Path]:
    """Prepare `out_dir` for a run of `recipe` (its `gin.config_str()`) and return the checkpoint
    folder to resume from (None for a new run).

    Raises:
        CheckpointError: a new run into a folder that holds checkpoints (it would mix two runs:
            resume it or choose another folder); `resume` with no complete checkpoint; resuming
            with a recipe other than the checkpoint's, naming the bindings that differ.
    """
    out_dir = Path(out_dir)
    checkpoints = out_dir / CHECKPOINTS
    existing = step_folders(checkpoints)
    if not resume:
        if existing:
            raise CheckpointError(
                f"{out_dir} already holds checkpoints (latest {existing[-1].name}): continue that run with --resume, "
                "or choose another --out"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METRICS).unlink(missing_ok=True)
        shutil.rmtree(out_dir / TENSORBOARD, ignore_errors=True)  # another run's events
        (out_dir / LENGTHS).unlink(missing_ok=True)  # another run's data
        (out_dir / RECIPE).write_text(recipe)
        return None
    if not existing:
        raise CheckpointError(f"{out_dir}: no complete checkpoint in {checkpoints} to resume from")
    latest = existing[-1]
    differences = recipe_differences(checkpoint_metadata(latest).get("recipe", ""), recipe)
    if differences:
        raise CheckpointError(f"{latest} was written by another recipe than this one; it differs in {'; '.join(differences)}")
    for leftover in checkpoints.glob(".step-*.partial"):  # a save the previous run did not finish
        shutil.rmtree(leftover, ignore_errors=True)
    return latest
