"""What a fine-tuning run reads: train and validation datasets, their collate function, the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from vlblocks.batch import VLBatch
from vlblocks.data.wordpiece import WordPieceTokenizer


@dataclass
class FinetuneData:
    """The datasets of a fine-tuning run and a sentence saying what they are.

    Attributes:
        train, val: datasets whose items `collate` turns into a `VLBatch`.
        tokenizer: the WordPiece tokenizer both were encoded with.
        description: printed at the start of the run.
        collate: samples → `VLBatch`.
        answers: the answer vocabulary (VQA), else None.
        is_demo: True on the embedded demo data (the trainer then runs its `demo_*` schedule).
        text: no text-only stream in fine-tuning.
    """

    train: Dataset
    val: Dataset
    tokenizer: WordPieceTokenizer
    description: str
    collate: Callable[[list], VLBatch]
    answers: Optional[list[str]] = None
    is_demo: bool = False
    text: None = None


def existing_file(path: str | Path, what: str, binding: str) -> Path:
    """`path` as a Path, or a `FileNotFoundError` saying what it should hold and which binding sets it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (set {binding} in the recipe, or --bind it)")
    return path
