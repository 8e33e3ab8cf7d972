import pickle
import random

import pytest

from vlblocks.data.pipeline import wordpiece
from vlblocks.data.pipeline.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer, train_wordpiece_vocab

TEXTS = [
    "A small red circle is left of a large blue square.",
    "There are three shapes: a purple diamond, an orange triangle and a green circle.",
    "the yellow square is above the red diamond .",
] * 20


@pytest.fixture
def vocab(tmp_path):
    return train_wordpiece_vocab(TEXTS, tmp_path / "vocab.txt", vocab_size=200)


def test_training_puts_special_tokens_first_and_is_deterministic(vocab, tmp_path):
    tokens = vocab.read_text().splitlines()
    assert tokens[:5] == SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens)) and len(tokens) <= 200
    assert "circle" in tokens and all(token == token.lower() for token in tokens[5:])
    again = train_wordpiece_vocab(list(TEXTS), tmp_path / "again" / "vocab.txt", vocab_size=200)
    assert again.read_bytes() == vocab.read_bytes()


def test_encode_words_maps_every_piece_to_its_word(vocab):
    tokenizer = WordPieceTokenizer(vocab)
    words = ["Circles", "squares", "red", "zzqx", "."]  # no "z" or "x" in the training text
    ids, word_indices = tokenizer.encode_words(words)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == len(word_indices)
    assert word_indices == sorted(word_indices) and set(word_indices) == set(range(len(words)))
    by_word = {}
    for piece, index in zip(pieces, word_indices):
        by_word.setdefault(index, []).append(piece)
    assert len(by_word[0]) > 1 and by_word[0][0] == "circle" and by_word[0][1].startswith("##")
    assert len(by_word[1]) > 1 and by_word[1][0] == "square"
    assert by_word[2] == ["red"] and by_word[4] == ["."]
    # each word's pieces join back into the lower-cased word
    for index, word in enumerate(words[:3]):
        assert "".join(piece.removeprefix("##") for piece in by_word[index]) == word.lower()
    assert by_word[3] == ["[UNK]"]  # BERT maps a word with an unknown character to one [UNK]
    assert tokenizer.encode_words([]) == ([], [])


def test_encode_text_has_no_special_tokens_and_decodes_back(vocab):
    tokenizer = WordPieceTokenizer(vocab)
    text = "a small red circle is left of a large blue square ."
    ids = tokenizer.encode_text(text)
    assert tokenizer.cls_id not in ids and tokenizer.sep_id not in ids
    decoded = tokenizer.decode(ids)
    assert decoded.replace(" .", ".") == text.replace(" .", ".")
    assert tokenizer.encode_text(decoded) == ids
    assert tokenizer.encode_text("A Small RED circle") == tokenizer.encode_text("a small red circle")
    with_mask = ids[:2] + [tokenizer.mask_id] + ids[3:]
    assert "[MASK]" in tokenizer.decode(with_mask)
    assert "[MASK]" not in tokenizer.decode(with_mask, skip_special_tokens=True)
    assert pickle.loads(pickle.dumps(tokenizer)).encode_text(text) == ids


def test_special_ids_are_looked_up_by_string(tmp_path, vocab):
    tokenizer = WordPieceTokenizer(vocab)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 1, 2, 3, 4)
    assert tokenizer.vocab_size == len(vocab.read_text().splitlines())
    # a BERT-style vocabulary with the special tokens at bert-base-uncased's positions
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "##s"]
    bert_vocab = tmp_path / "bert_vocab.txt"
    bert_vocab.write_text("\n".join(tokens) + "\n")
    bert = WordPieceTokenizer(bert_vocab)
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 100, 101, 102, 103)
    assert bert.token_to_id("circle") == 105 and bert.vocab_size == len(tokens)
    assert bert.encode_words(["Red", "circles", "blue"]) == ([104, 105, 106, 100], [0, 1, 1, 2])
    with pytest.raises(KeyError, match="nope"):
        bert.token_to_id("nope")


def uncached(tokenizer, words):
    """One `tokenizers` call over the whole list: ids and the word of each."""
    if not words:
        return [], []
    whole = tokenizer._tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    return list(whole.ids), list(whole.word_ids)


def test_cached_words_encode_as_the_whole_list_does(vocab):
    """`encode_words` takes each word's pieces from a cache; they must be what one `tokenizers`
    call over the whole list gives, for words that split, vanish or turn into [UNK]."""
    tokenizer = WordPieceTokenizer(vocab)
    alphabet = list("abcdefghijklmnopqrstuvwxyzCIRSQ .,:;!?'-") + ["é", "Å", "中", "\t", "\x00", "\u200b", "ﬁ"]
    generator = random.Random(0)
    for _ in range(300):
        words = ["".join(generator.choices(alphabet, k=generator.randint(0, 12))) for _ in range(generator.randint(0, 9))]
        words += generator.choice([[], ["x" * 120], ["circle"], ["", " "]])
        assert tokenizer.encode_words(words) == uncached(tokenizer, words), words
    assert len(tokenizer._word_pieces) > 1000, "the cache was used"
    assert tokenizer.encode_words(word for word in ["red", "circles"]) == uncached(tokenizer, ["red", "circles"]), "any iterable"


def test_the_word_cache_empties_when_full(vocab, monkeypatch):
    monkeypatch.setattr(wordpiece, "WORD_CACHE_SIZE", 3)
    tokenizer = WordPieceTokenizer(vocab)
    for words in (["red", "circle"], ["red", "blue"], ["red", "square", "squares"]):  # the third overflows
        assert tokenizer.encode_words(words) == uncached(tokenizer, words)
    assert set(tokenizer._word_pieces) == {"red", "square", "squares"}
