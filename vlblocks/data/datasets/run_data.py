"""What a run reads: train and validation datasets, how to batch them, the tokenizer, and a
sentence saying what they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo, Tokenizer


@dataclass
class RunData:
    """The datasets of a run, as a data builder (`pretraining_data`, `vqa_data`, ...) returns them.

    Attributes:
        train, val: datasets whose items `collate` turns into a `VLBatch`.
        tokenizer: the WordPiece tokenizer both were encoded with.
        description: printed at the start of the run (says when it is the demo data, and how
            to point the recipe at real data).
        collate: samples → `VLBatch`.
        is_demo: True on the embedded demo data (the Trainer is then built in the gin scope `demo`).
        text: the text-only corpus of pre-training (map-style, shuffled and shared between
            processes like `train`; an iterable dataset is read in order), else None.
        answers: the answer vocabulary (VQA), else None.
        word_groups: name → token ids of words whose masked-word accuracy evaluation reports on
            its own (the demo's colour, shape and relation words), else None.
    """

    train: Dataset
    val: Dataset
    tokenizer: Tokenizer
    description: str
    collate: Callable[[list], VLBatch]
    is_demo: bool = False
    text: Optional[Dataset] = None
    answers: Optional[list[str]] = None
    word_groups: Optional[dict[str, list[int]]] = None

    def fit_region_classes(self, columns: int, echo: Echo) -> None:
        """Widen the detector's class distributions to a region head of `columns` classes where
        the data allows it; data of a real detector stays as it is (a mismatch is an error the
        masked-region loss names)."""


def existing_file(path: str | Path, what: str, binding: str) -> Path:
    """`path` as a Path, or a `FileNotFoundError` saying what it should hold and which binding sets it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (set {binding} in the recipe, or --bind it)")
    return path
