"""The small contracts that more than one layer meets on, beside the batch (`vlblocks.batch`).

`Tokenizer` is what datasets encode text with and what tasks fit their vocabulary to; `Echo` is
how library code hands a progress or report line to whoever runs it (the CLI prints it, tests
collect it).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

Echo = Callable[[str], None]


class Tokenizer(Protocol):
    """A WordPiece tokenizer as the datasets and tasks use it (`WordPieceTokenizer` is one)."""

    @property
    def cls_id(self) -> int: ...

    @property
    def sep_id(self) -> int: ...

    @property
    def mask_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_words(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
        """Pre-split words → (WordPiece ids [T], index of the word each id came from [T])."""
        ...
