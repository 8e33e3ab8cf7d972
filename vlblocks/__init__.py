"""vlblocks: composable blocks for visual-linguistic Transformers; `batch.py` (VLBatch), `contracts.py` and `seeding.py` are the base every layer stands on, and `load`, `build` and `train` (re-exported lazily from the app layer, to which this file's own imports belong) are the Python entry points.
May import: nothing else of vlblocks.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Sequence

__version__ = "0.1.0"  # the one place the version lives (pyproject.toml reads it)


def load(source: str | Path | tuple[str | Path, str | Path], device: str = "cpu", bindings: Sequence[str] = ()) -> Any:
    """A fine-tuned model with its preprocessing, ready for `answer` (VQA), `ground` (RefCOCO+)
    or `choose` (VCR): from a folder `vlblocks export` wrote, or a (recipe, checkpoint) pair.
    See `vlblocks.app.inference.load` and docs/inference.md."""
    from vlblocks.app.inference import load as load_predictor  # lazy: `import vlblocks` stays light

    return load_predictor(source, device, bindings)


def build(recipe: str | Path, bindings: Sequence[str] = ()) -> Any:
    """What a recipe (a file or a bundled recipe's name) assembles: a `Run` (task, data, trainer)
    for a training recipe, else its model. See `vlblocks.app.api.build` and docs/python-api.md."""
    from vlblocks.app.api import build as build_recipe

    return build_recipe(recipe, bindings)


def train(recipe: str | Path, out: str | Path, bindings: Sequence[str] = (), **options: Any) -> dict[str, float]:
    """Run what `vlblocks train` runs; returns the validation metrics. Options: `max_steps`,
    `device`, `precision`, `resume`, `echo`. See `vlblocks.app.api.train`."""
    from vlblocks.app.api import train as train_recipe

    return train_recipe(recipe, out, bindings, **options)


class _Package(types.ModuleType):
    """`vlblocks.train` is the function above, also once the subpackage `vlblocks.train` (the
    training loop) is imported: importing a subpackage sets it as an attribute of its parent,
    which this property ignores (the subpackage stays importable by name, `vlblocks.train.loop`)."""

    @property
    def train(self) -> Any:
        return _train_function

    @train.setter
    def train(self, value: Any) -> None:
        pass


_train_function = train
sys.modules[__name__].__class__ = _Package

