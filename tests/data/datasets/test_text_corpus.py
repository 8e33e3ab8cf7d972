"""The text-only corpus samples of the official GeneralCorpus (pretrain/data/datasets/general_corpus.py)
and their per-epoch shuffling, with hand-listed expectations."""

import numpy as np
import pytest

from vlblocks.data.datasets import text_corpus
from vlblocks.data.datasets.text_corpus import TextCorpusChunks, nonblank_line_offsets
from vlblocks.data.errors import DataError
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.train.batches import BatchStream

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", ".", "dog", "##s", "run", "a", "mat"]
# ids:       0        1        2        3        4       5      6      7     8     9      10     11    12    13

# Byte offsets: "The cat sat.\n" 0..12, "\n" 13, "   \t \n" 14..19, "Dogs run\r\n" 20..29,
# "a mat\r" 30..35 (a lone CR ends a line), "Cat\n" 36..39, "\u3000\u00a0\n" 40..45 (only
# non-ASCII whitespace: blank for str.strip()), "\x1c \n" 46..48 (ASCII separator: whitespace).
CORPUS = "The cat sat.\n\n   \t \nDogs run\r\na mat\rCat\n\u3000\u00a0\n\x1c \n"
OFFSETS = [0, 20, 30, 36]


@pytest.fixture
def tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(token + "\n" for token in VOCAB))
    return WordPieceTokenizer(path)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(CORPUS.encode("utf-8"))
    return path


def test_offsets_of_nonblank_lines(corpus):
    assert nonblank_line_offsets(corpus).tolist() == OFFSETS


@pytest.mark.parametrize("block", [1, 2, 4, 5, 7, 64])
def test_offsets_do_not_depend_on_the_block_size(corpus, monkeypatch, block):
    monkeypatch.setattr(text_corpus, "_BLOCK_BYTES", block)  # lines cross blocks, "\r\n" split between two
    assert nonblank_line_offsets(corpus).tolist() == OFFSETS


def test_unterminated_last_line_and_non_ascii_text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\u00a0caf\u00e9\n \n\u3000x".encode("utf-8"))  # NBSP+"café" is text; last line "\u3000x" has no newline
    # "\u00a0café\n" = 2 + 3 + 2 + 1 = 8 bytes (0..7), " \n" 8..9, "\u3000x" from 10
    assert nonblank_line_offsets(path).tolist() == [0, 10]


def test_samples_are_the_official_ones(corpus, tokenizer):
    # min_words 4, cut to 5 pieces. Lines: L0 the cat sat . | L1 dogs run | L2 a mat | L3 cat
    # S0: L0 = 4 words -> the cat sat . -> [5, 6, 7, 8]
    # S1: L1 + L2 = dogs run a mat -> dog ##s run a mat -> [9, 10, 11, 12, 13], words [0, 0, 1, 2, 3]
    # S2: L2 + L3 = 3 words < 4, wraps to L0: a mat cat the cat sat . -> cut to [12, 13, 6, 5, 6]
    # S3: L3 + L0 = cat the cat sat . -> [6, 5, 6, 7, 8]
    dataset = TextCorpusChunks(corpus, tokenizer, chunk_length=5, min_words=4)
    assert len(dataset) == 4
    assert [dataset[i].text_ids.tolist() for i in range(4)] == [[5, 6, 7, 8], [9, 10, 11, 12, 13], [12, 13, 6, 5, 6], [6, 5, 6, 7, 8]]
    assert [dataset[i].word_index.tolist() for i in range(4)] == [[0, 1, 2, 3], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert [dataset[i].position for i in range(4)] == [0, 1, 2, 3]
    assert dataset.words(2) == ["a", "mat", "cat", "the", "cat", "sat", "."]
    with pytest.raises(IndexError):
        dataset[4]


def test_words_are_counted_not_pieces(corpus, tokenizer):
    # min_words 3: S1 = dogs run (2 words, 3 pieces) + a mat -> 4 words; counting pieces would stop at L1
    dataset = TextCorpusChunks(corpus, tokenizer, chunk_length=64, min_words=3)
    assert dataset[1].text_ids.tolist() == [9, 10, 11, 12, 13]


def test_a_short_corpus_is_read_around_as_often_as_needed(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("run\n\nrun a\n")
    # S0: run | run a | run | run a -> 6 >= 5 words; S1: run a | run | run a -> 5 words
    dataset = TextCorpusChunks(path, tokenizer, chunk_length=64, min_words=5)
    assert [dataset[i].text_ids.tolist() for i in range(2)] == [[11, 11, 12, 11, 11, 12], [11, 12, 11, 11, 12]]


def test_files_joined_by_plus_are_one_corpus(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text("dogs\n")
    (tmp_path / "c.txt").write_text("\ncat run\n")
    # lines: dogs | cat run; S1 = cat run, then the first file again: cat run dogs
    dataset = TextCorpusChunks(f"{tmp_path / 'b.txt'}+{tmp_path / 'c.txt'}", tokenizer, chunk_length=64, min_words=3)
    assert len(dataset) == 2
    assert dataset[0].text_ids.tolist() == [9, 10, 6, 11]
    assert dataset[1].text_ids.tolist() == [6, 11, 9, 10]


def test_bad_corpora_raise_data_errors(tmp_path, tokenizer):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="blank.txt holds no non-blank line"):
        TextCorpusChunks(blank, tokenizer)
    control = tmp_path / "control.txt"
    control.write_text("\x00\x01\n")  # not whitespace, but basic tokenisation removes it
    with pytest.raises(DataError, match="control.txt holds no word"):
        TextCorpusChunks(control, tokenizer)[0]
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"cat\nrun \xff\xfe\n")
    dataset = TextCorpusChunks(broken, tokenizer, min_words=1)
    assert dataset[0].text_ids.tolist() == [6]
    with pytest.raises(DataError, match=r"broken.txt: the line at byte 4 is not valid UTF-8"):
        dataset[1]
    later = tmp_path / "later.txt"
    later.write_bytes(b"cat\r\nrun\rdogs\n\xff\n")  # "cat\r\n" 0..4, "run\r" 5..8, "dogs\n" 9..13, bad line at 14
    with pytest.raises(DataError, match=r"later.txt: the line at byte 14 is not valid UTF-8"):
        TextCorpusChunks(later, tokenizer, min_words=64)[0]
    with pytest.raises(DataError, match="missing.txt"):
        TextCorpusChunks(tmp_path / "missing.txt", tokenizer)


class NumberTokenizer:
    """Word "17" -> piece 17 (picklable for loader workers)."""

    def encode_words(self, words):
        return [int(word) for word in words], list(range(len(words)))


def epoch_orders(path, seed, workers, epochs=3, world_size=2, batch_size=2):
    """Per epoch, per rank, the samples (their one piece) in the order the streams give them."""
    dataset = TextCorpusChunks(path, NumberTokenizer(), chunk_length=1, min_words=1)
    streams = [BatchStream(dataset, batch_size, collate_text, seed, num_workers=workers, rank=rank, world_size=world_size)
               for rank in range(world_size)]
    steps = len(dataset) // (batch_size * world_size)
    orders = []
    for _ in range(epochs):
        orders.append([[int(x) for _ in range(steps) for x in next(stream).text_ids[:, 0]] for stream in streams])
    assert all(stream.epoch == epochs - 1 for stream in streams)
    return orders


@pytest.fixture
def numbers(tmp_path):
    path = tmp_path / "numbers.txt"
    path.write_text("".join(f"{10 + i}\n" for i in range(8)))  # 8 samples: 10 .. 17
    return path


def test_every_sample_once_per_epoch_across_ranks_and_workers_in_a_new_order(numbers):
    orders = epoch_orders(numbers, seed=3, workers=2)
    for ranks in orders:
        assert len(ranks[0]) == len(ranks[1]) == 4
        assert sorted(ranks[0] + ranks[1]) == list(range(10, 18))
    assert orders[0] != orders[1] != orders[2]
    assert orders == epoch_orders(numbers, seed=3, workers=0), "the order does not depend on the workers"
    assert orders != epoch_orders(numbers, seed=4, workers=0)


def test_samples_are_ints_as_collation_needs(corpus, tokenizer):
    sample = TextCorpusChunks(corpus, tokenizer, chunk_length=5, min_words=4)[1]
    assert sample.text_ids.dtype == np.int64 and sample.word_index.dtype == np.int64
    assert collate_text([sample]).text_ids.tolist() == [[9, 10, 11, 12, 13]]
