"""The text-only corpus as VL-BERT samples it: one sample starting at each non-blank line.

The official `GeneralCorpus` (pretrain/data/datasets/general_corpus.py) reads its files (paths
joined by '+') into one list of lines, stripped, blank lines dropped. Sample i is line i's words
(BERT basic tokenisation), followed by the words of lines i+1, i+2, ... (wrapping from the last
line of the last file to the first line of the first) until it holds at least MIN_SEQ_LEN (64)
words; the words are then cut into WordPieces and the pieces cut to SEQ_LEN (64). No [CLS] or
[SEP] is added. Its loader shuffles the samples every epoch (`TRAIN.SHUFFLE: true`).

Here only the byte offset of each non-blank line is kept in memory (8 bytes a line), and a sample
is read by seeking to its line. `TextCorpusChunks` is a map-style dataset, so the training
stream (`BatchStream`) shuffles it each epoch with its seeded generator and shares every global
batch among the processes and the loader workers, as it does the image-text samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset

from vlblocks.contracts import Tokenizer
from vlblocks.data.errors import DataError
from vlblocks.data.formats.records import basic_tokenize, record_index
from vlblocks.data.pipeline.sample import TextChunk

_BLOCK_BYTES = 1 << 24
_LINE_FEED, _CARRIAGE_RETURN = 10, 13
# The ASCII characters `str.strip()` removes; bytes >= 0x80 are decoded to be judged.
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_ASCII_TEXT = np.ones(256, dtype=bool)
_ASCII_TEXT[128:] = False
_ASCII_TEXT &= ~_ASCII_SPACE


def corpus_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The corpus files: a sequence of paths, or one path string, split on '+' as VL-BERT's
    `TRAIN_ANNOTATION_FILE` is (unless the whole string names an existing file)."""
    if isinstance(path, (str, Path)):
        text = str(path)
        parts = [text] if os.path.exists(text) or "+" not in text else text.split("+")
    else:
        parts = [str(part) for part in path]
    if not parts:
        raise ValueError("the text corpus needs at least one file")
    return [Path(part) for part in parts]


def nonblank_line_offsets(path: Path) -> np.ndarray:
    """[lines] int64 byte offset of each line of `path` that is not blank after `str.strip()`.

    Lines end at "\\n", "\\r\\n" or "\\r" (Python's universal newlines, as the official
    `open(...).readlines()` reads them). The file is scanned in blocks, with numpy.

    Raises:
        DataError: the file cannot be read.
    """
    try:
        size = path.stat().st_size
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read text corpus {path}: {getattr(error, 'strerror', None) or error}") from error
    found: list[np.ndarray] = []
    position, block_bytes = 0, _BLOCK_BYTES
    while position < size:
        block = np.asarray(data[position : position + block_bytes + 1])  # one byte more: is a "\r" followed by "\n"?
        body = block[:block_bytes]
        ends = _line_ends(block, len(body), at_file_end=position + len(body) >= size)
        if len(ends) == 0:
            block_bytes *= 2  # a line longer than the block: read more of it
            continue
        starts = np.concatenate(([0], ends[:-1] + 1))
        found.append(position + starts[_nonblank(body, starts, ends)])
        position, block_bytes = position + int(ends[-1]) + 1, _BLOCK_BYTES
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def _line_ends(block: np.ndarray, length: int, at_file_end: bool) -> np.ndarray:
    """Offsets in `block[:length]` of the byte that ends each line ("\\n", or a "\\r" not followed
    by "\\n"); at the file's end an unterminated last line ends at `length`."""
    body = block[:length]
    following = block[1 : length + 1]
    if len(following) < length:
        following = np.append(following, 0)
    ends = np.flatnonzero((body == _LINE_FEED) | ((body == _CARRIAGE_RETURN) & (following != _LINE_FEED)))
    if at_file_end and (len(ends) == 0 or ends[-1] != length - 1):
        ends = np.append(ends, length)
    return ends


def _nonblank(body: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[lines] bool: line [start, end) of `body` holds a character `str.strip()` keeps."""
    ascii_text = np.concatenate(([0], np.cumsum(_ASCII_TEXT[body], dtype=np.int64)))
    high = np.concatenate(([0], np.cumsum(body >= 128, dtype=np.int64)))
    keep = (ascii_text[ends] - ascii_text[starts]) > 0
    for line in np.flatnonzero(~keep & ((high[ends] - high[starts]) > 0)):  # only non-ASCII: decode to judge
        text = bytes(body[starts[line] : ends[line]]).decode("utf-8", errors="replace")
        keep[line] = bool(text.strip())
    return keep


class TextCorpusChunks(Dataset):
    """VL-BERT's text-only samples, one starting at each non-blank line of the corpus.

    Sample i: the basic-tokenised words of non-blank line i and of the lines after it (blank
    lines skipped, the last line of the last file followed by the first of the first, around as
    often as needed) until there are at least `min_words` words, as WordPieces cut to
    `chunk_length`. Words that a cut leaves are dropped.

    Args:
        path: the corpus file(s), one paragraph per line (see `corpus_files`).
        tokenizer: WordPiece tokenizer (`encode_words`).
        chunk_length: SEQ_LEN, the most pieces of a sample (64 in VL-BERT).
        min_words: MIN_SEQ_LEN, the fewest words of a sample before the cut (64 in VL-BERT).

    `dataset[i]` → `TextChunk`: text_ids [<= chunk_length] pieces (no [CLS]/[SEP]), word_index
    [same] the word (numbered from 0 in the sample) of each piece, position i.

    Raises:
        DataError: a file cannot be read or decoded (file and byte offset named), or the
            corpus holds no word at all.
    """

    def __init__(
        self, path: str | Path | Sequence[str | Path], tokenizer: Tokenizer, chunk_length: int = 64, min_words: int = 64
    ) -> None:
        if chunk_length < 1 or min_words < 1:
            raise ValueError(f"chunk_length and min_words must be positive, got {chunk_length} and {min_words}")
        self.files = corpus_files(path)
        self.tokenizer = tokenizer
        self.chunk_length = chunk_length
        self.min_words = min_words
        per_file = [nonblank_line_offsets(file) for file in self.files]
        self._offsets = np.concatenate(per_file) if per_file else np.zeros(0, np.int64)
        self._first_sample = np.cumsum([0] + [len(offsets) for offsets in per_file])  # [files + 1]
        if len(self._offsets) == 0:
            raise DataError(f"the text corpus {self._name()} holds no non-blank line")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> TextChunk:
        index = record_index(index, len(self), f"samples (non-blank lines) of the text corpus {self._name()}")
        words = self.words(index)
        ids, word_ids = self.tokenizer.encode_words(words)
        return TextChunk(np.asarray(ids[: self.chunk_length], dtype=np.int64), np.asarray(word_ids[: self.chunk_length], dtype=np.int64), index)

    def words(self, index: int) -> list[str]:
        """The words of sample `index`, before WordPiece and the cut (at least `min_words`)."""
        index = record_index(index, len(self), f"samples (non-blank lines) of the text corpus {self._name()}")
        words: list[str] = []
        for lines_read, line in enumerate(self._lines_from(index)):
            words += basic_tokenize(line)
            if len(words) >= self.min_words:
                return words
            if lines_read + 1 >= len(self) and not words:
                raise DataError(f"the text corpus {self._name()} holds no word: every non-blank line tokenises to nothing")
        raise AssertionError("unreachable: the corpus lines repeat forever")

    def _lines_from(self, index: int) -> Iterator[str]:
        """The stripped non-blank lines from sample `index`'s on, through the files, forever."""
        file = int(np.searchsorted(self._first_sample, index, side="right")) - 1
        offset = int(self._offsets[index])
        while True:
            yield from _stripped_lines(self.files[file], offset)
            file, offset = (file + 1) % len(self.files), 0

    def _name(self) -> str:
        return "+".join(str(file) for file in self.files)


def _stripped_lines(path: Path, offset: int) -> Iterator[str]:
    """The non-blank lines of `path` from byte `offset` on, stripped (universal newlines: "\n",
    "\r\n" or "\r" ends a line). Each line is decoded alone, so a bad byte fails only the
    samples that read its line."""
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            for chunk in raw:  # split at "\n"; a chunk may hold lines ended by a lone "\r"
                body = chunk[:-1] if chunk.endswith(b"\n") else chunk
                for part in (body[:-1] if body.endswith(b"\r") else body).split(b"\r"):
                    line = _decode(part, path, offset).strip()
                    offset += len(part) + 1
                    if line:
                        yield line
                offset += len(chunk) - len(body) - (0 if body.endswith(b"\r") else 1)  # the "\n" if not counted yet
    except OSError as error:
        raise DataError(f"cannot read text corpus {path}: {error.strerror or error}") from error


def _decode(line: bytes, path: Path, offset: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"text corpus {path}: the line at byte {offset} is not valid UTF-8 ({error.reason})") from None
