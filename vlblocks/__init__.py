"""vlblocks: composable blocks for visual-linguistic Transformers; `batch.py` (VLBatch), `contracts.py` and `seeding.py` are the base every layer stands on, and `load` (re-exported lazily from the app layer, to which this file's own imports belong) is the entry point for predictions.
May import: nothing else of vlblocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def load(source: str | Path | tuple[str | Path, str | Path], device: str = "cpu", bindings: Sequence[str] = ()) -> Any:
    """A fine-tuned model with its preprocessing, ready for `answer` (VQA), `ground` (RefCOCO+)
    or `choose` (VCR): from a folder `vlblocks export` wrote, or a (recipe, checkpoint) pair.
    See `vlblocks.app.inference.load` and docs/inference.md."""
    from vlblocks.app.inference import load as load_predictor  # lazy: `import vlblocks` stays light

    return load_predictor(source, device, bindings)
