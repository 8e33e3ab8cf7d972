"""BERT WordPiece: train a small vocabulary and tokenise words with word alignment.

Tokenisation uses the `tokenizers` library directly. (transformers 5's
`BertTokenizerFast(vocab_file=...)` silently ignores the file, so it is deliberately not used.)
Training uses `tokenizers`' BERT normaliser and pre-tokeniser but its own merge loop:
`tokenizers`' WordPiece trainer numbers continuation pieces in hash-map order, so equally frequent
merges are chosen differently from run to run, and the vocabulary would not be reproducible.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import BertWordPieceTokenizer

from vlblocks.data.formats.records import basic_tokenize

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTINUATION = "##"
# Words whose pieces a tokenizer keeps (started afresh when full): about 10 MB, and most words of a corpus.
WORD_CACHE_SIZE = 1 << 16


def train_wordpiece_vocab(
    texts: Iterable[str], path: Path, vocab_size: int = 1000, min_frequency: int = 2
) -> Path:
    """Trains a lower-cased BERT WordPiece vocabulary and writes it as `vocab.txt`.

    Like `tokenizers`' WordPiece trainer: words (after BERT's lower-casing, accent stripping and
    punctuation splitting) start as characters, non-initial ones prefixed with `##`, and the
    most frequent adjacent pair (by word frequency, at least `min_frequency`) is merged until the
    vocabulary is full. Ties go to the alphabetically first pair, so the result is deterministic.

    Args:
        texts: training text, e.g. one caption or paragraph per item.
        path: the vocabulary file to write (one token per line, line number = id).
        vocab_size: the largest vocabulary (the alphabet is always kept whole).
        min_frequency: the least frequency of a pair to be merged.

    Returns:
        `path`, whose lines are [PAD], [UNK], [CLS], [SEP], [MASK], the characters, their `##`
        forms, then the merged pieces in merge order.
    """
    word_counts = _count_words(texts)
    words = [_split_characters(word) for word in sorted(word_counts)]
    frequencies = [word_counts[word] for word in sorted(word_counts)]
    symbols = {symbol for word in words for symbol in word}
    alphabet = sorted(symbols, key=lambda symbol: (symbol.startswith(CONTINUATION), symbol))
    vocab = {token: None for token in SPECIAL_TOKENS + alphabet}  # an ordered set
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for index, (word, frequency) in enumerate(zip(words, frequencies)):
        _count_pairs(word, frequency, index, pair_counts, pair_words)
    while len(vocab) < vocab_size:
        candidates = [(-count, pair) for pair, count in pair_counts.items() if count >= min_frequency]
        if not candidates:
            break
        _, best = min(candidates)
        merged = best[0] + best[1].removeprefix(CONTINUATION)
        vocab.setdefault(merged, None)
        for index in sorted(pair_words.pop(best)):
            _count_pairs(words[index], -frequencies[index], index, pair_counts, pair_words)
            words[index] = _merge(words[index], best, merged)
            _count_pairs(words[index], frequencies[index], index, pair_counts, pair_words)
        pair_counts = +pair_counts  # drop pairs that no longer occur
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    return path


def _count_words(texts: Iterable[str]) -> Counter[str]:
    """Word frequencies after BERT's uncased normalisation and basic tokenisation."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(basic_tokenize(text))
    return counts


def _split_characters(word: str) -> list[str]:
    return [word[0]] + [CONTINUATION + character for character in word[1:]]


def _count_pairs(
    word: list[str],
    frequency: int,
    index: int,
    pair_counts: Counter[tuple[str, str]],
    pair_words: defaultdict[tuple[str, str], set[int]],
) -> None:
    """Adds (or, with a negative frequency, removes) a word's adjacent pairs."""
    for pair in zip(word, word[1:]):
        pair_counts[pair] += frequency
        if frequency > 0:
            pair_words[pair].add(index)


def _merge(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """Replaces each non-overlapping occurrence of `pair`, left to right."""
    result = []
    position = 0
    while position < len(word):
        if position + 1 < len(word) and (word[position], word[position + 1]) == pair:
            result.append(merged)
            position += 2
        else:
            result.append(word[position])
            position += 1
    return result


class WordPieceTokenizer:
    """BERT WordPiece tokeniser over a `vocab.txt` (a trained demo vocabulary or bert-base's).

    Args:
        vocab_file: one token per line; the line number (from 0) is the id.
        lowercase: lower-case (and strip accents from) the text first, as uncased BERT does.
    """

    def __init__(self, vocab_file: Path, lowercase: bool = True) -> None:
        self.vocab_file = Path(vocab_file)
        self.lowercase = lowercase
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {self.vocab_file}")
        self._tokenizer = BertWordPieceTokenizer(str(self.vocab_file), lowercase=lowercase)
        self._word_pieces: dict[str, tuple[int, ...]] = {}

    def __reduce__(self):
        # Rebuilt from the file in worker processes rather than pickling the Rust object.
        return (WordPieceTokenizer, (self.vocab_file, self.lowercase))

    def encode_words(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
        """Tokenises pre-split words, with no special tokens.

        Returns:
            ids: [T] WordPiece ids.
            word_indices: [T] for each id, the index in `words` of the word it came from. A word
                that yields no piece (e.g. only control characters) has no entry.
        """
        pieces_of_words = self._pieces_of(words)
        ids = [piece for pieces in pieces_of_words for piece in pieces]
        word_indices = [index for index, pieces in enumerate(pieces_of_words) for _ in pieces]
        return ids, word_indices

    def _pieces_of(self, words: Iterable[str]) -> list[tuple[int, ...]]:
        """Each word's WordPiece ids, from a per-word cache; the words not in it are encoded
        together. WordPiece never looks across words, so a word's pieces do not depend on its
        neighbours, and one `tokenizers` call per caption would cost more than the lookups."""
        words = list(words)
        cache = self._word_pieces  # a full cache is replaced, never emptied, so this call's words stay in it
        missing = list(dict.fromkeys(word for word in words if word not in cache))
        if missing:
            if len(cache) + len(missing) > WORD_CACHE_SIZE:
                cache = self._word_pieces = {}
                missing = list(dict.fromkeys(words))
            encodings = self._tokenizer.encode_batch([[word] for word in missing], is_pretokenized=True, add_special_tokens=False)
            cache.update(zip(missing, (tuple(encoding.ids) for encoding in encodings)))
        return [cache[word] for word in words]

    def encode_text(self, text: str) -> list[int]:
        """Tokenises raw text (BERT basic tokenisation, then WordPiece), with no special tokens."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Joins ids back into text (`##` continuations glued to the previous piece)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The token string of each id."""
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int:
        """The id of a token string.

        Raises:
            KeyError: the token is not in the vocabulary.
        """
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(f"token {token!r} is not in {self.vocab_file}")
        return index

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.token_to_id("[PAD]")

    @property
    def unk_id(self) -> int:
        return self.token_to_id("[UNK]")

    @property
    def cls_id(self) -> int:
        return self.token_to_id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self.token_to_id("[SEP]")

    @property
    def mask_id(self) -> int:
        return self.token_to_id("[MASK]")
