"""`vlblocks convert official`: an official VL-BERT checkpoint → a vlblocks weights file for a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import gin

from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.contracts import Echo
from vlblocks.interop.official_vlbert import load_official_weights, read_official_checkpoint, write_weights_file
from vlblocks.train.checkpoint import MODEL_FILE

# The converted weights replace every tensor, so the recipe's BERT directory is not read.
NO_BERT = "build_model.bert_directory = None"


def converted_path(out: str | Path) -> Path:
    """`out` when it names a `.safetensors` file, else `out/model.safetensors` (a checkpoint folder)."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out / MODEL_FILE


def convert_official(
    checkpoint: str | Path,
    recipe: str | Path,
    out: str | Path,
    bindings: Sequence[str] = (),
    ignore: Sequence[str] = (),
    echo: Echo = print,
) -> Path:
    """Convert an official `.model` file into a vlblocks checkpoint for `recipe`'s task.

    The file it writes is what `vlblocks eval --checkpoint`, `experiment.pretrained` and
    `load_checkpoint` read (its metadata holds the recipe, step 0 and the source file). The task
    is built without data and without the recipe's BERT directory; the official file is read
    before anything is written, and the output appears whole or not at all.

    Raises:
        RecipeError: the recipe does not parse or build.
        CheckpointError: the official file is unreadable or does not fit the recipe's task.
    """
    source = Path(checkpoint)
    state = read_official_checkpoint(source)
    parse_recipe(recipe, [*bindings, NO_BERT])
    build_task = build_from_recipe(recipe, experiment, echo)[0]
    task = build_from_recipe(recipe, build_task, echo)
    conversion = load_official_weights(task, state, str(source), ignore)
    echo(str(conversion))
    metadata = {"step": "0", "recipe": gin.config_str(), "converted_from": str(source)}
    return write_weights_file(task, converted_path(out), metadata)
