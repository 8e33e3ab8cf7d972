"""The text-only corpus (one paragraph per line) as 64-piece chunks, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from vlblocks.contracts import Tokenizer
from vlblocks.data.pipeline.sample import TextChunk


class TextCorpusChunks(IterableDataset):
    """Paragraphs are tokenised and concatenated until a chunk holds at least `chunk_length`
    pieces, which is then cut to `chunk_length` (the rest is dropped, as in VL-BERT). Streams
    the file line by line, cycling forever when `repeat` (a training stream). Chunks are
    numbered in stream order (`TextChunk.position`); with DataLoader workers, worker w of n
    yields the chunks whose number is w modulo n, so no chunk comes twice."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, chunk_length: int = 64, repeat: bool = True) -> None:
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.chunk_length = chunk_length
        self.repeat = repeat

    def __iter__(self) -> Iterator[TextChunk]:
        worker = get_worker_info()
        share, shares = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        position = 0
        while True:
            pieces: list[int] = []
            words: list[int] = []
            word_offset = 0
            produced = False
            with self.path.open(encoding="utf-8") as lines:
                for line in lines:
                    line_words = line.split()
                    if not line_words:
                        continue
                    ids, word_ids = self.tokenizer.encode_words(line_words)
                    pieces += ids
                    words += [word_offset + w for w in word_ids]
                    word_offset += len(line_words)
                    if len(pieces) >= self.chunk_length:
                        if position % shares == share:
                            yield TextChunk(np.asarray(pieces[: self.chunk_length]), np.asarray(words[: self.chunk_length]) - words[0], position)
                        position += 1
                        produced = True
                        pieces, words, word_offset = [], [], 0
            if not self.repeat or not produced:
                return
