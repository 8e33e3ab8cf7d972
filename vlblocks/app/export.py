"""`vlblocks export`: a fine-tuned checkpoint → a self-contained folder that `vlblocks.load` rebuilds.

The folder holds the resolved recipe (`recipe.gin`, `gin.config_str()` of the built run: no
includes, no data needed to rebuild the model), the task's weights (`model.safetensors`), the
WordPiece `vocab.txt`, `preprocessing.json` (image transform and dataset options), for VQA
`answers.json` (the classifier's answers in order) and `bert/`, the text Transformer as a
`transformers.BertModel` directory. It is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import gin
from safetensors.torch import save_model

from vlblocks.app.inference import (
    ANSWERS_FILE,
    BERT_FOLDER,
    MODEL_FILE,
    PREPROCESSING_FILE,
    RECIPE_FILE,
    VOCAB_FILE,
    InferenceError,
    model_from_run,
)
from vlblocks.contracts import Echo
from vlblocks.interop.export import export_bert
from vlblocks.train.checkpoint import checkpoint_metadata


def export_model(checkpoint: str | Path, recipe: str | Path, out: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> Path:
    """Write the export folder `out` of `checkpoint` (a step folder or weights file) trained with
    `recipe` and `bindings`; returns `out`.

    Raises:
        InferenceError: `out` exists and is not empty, or the recipe's task cannot predict.
        CheckpointError: the checkpoint does not fit the recipe's model.
        RecipeError: the recipe cannot be built.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out}: already exists and is not an empty folder (nothing written)")
    task, preprocessing = model_from_run(recipe, checkpoint, bindings, echo)
    recipe_text = gin.config_str()
    step = checkpoint_metadata(checkpoint).get("step", "")
    temporary = out.parent / f".{out.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        (temporary / RECIPE_FILE).write_text(recipe_text)
        save_model(task, str(temporary / MODEL_FILE), metadata={"recipe": recipe_text, "step": step})
        shutil.copyfile(preprocessing.vocab, temporary / VOCAB_FILE)
        (temporary / PREPROCESSING_FILE).write_text(json.dumps(preprocessing.to_json(), indent=2) + "\n")
        if preprocessing.answers is not None:
            (temporary / ANSWERS_FILE).write_text(json.dumps(preprocessing.answers, indent=1) + "\n")
        export_bert(task.vlbert, temporary / BERT_FOLDER)
        if out.exists():
            out.rmdir()
        temporary.rename(out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    echo(f"exported {type(task).__name__} (step {step or '?'}) to {out}")
    return out
