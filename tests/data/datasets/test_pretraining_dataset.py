"""Reader → tokenise → truncate → image pipeline → collate, on the demo data in the real CC layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlblocks.data.datasets.pretraining import PretrainingDataset, encode_caption, truncate_to_budget
from vlblocks.data.datasets.text_corpus import TextCorpusChunks
from vlblocks.data.demo.scenes import write_demo_dataset
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.pipeline.collate import collate_pretraining, collate_text
from vlblocks.data.pipeline.images import ImageTransform, scale_boxes
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), train=40, val=10, seed=0)


@pytest.mark.parametrize(
    "text, boxes, budget, expected",
    [(10, 5, 64, (10, 5)), (40, 40, 64, (32, 32)), (60, 10, 64, (54, 10)), (5, 100, 64, (5, 59)), (2, 1, 2, (2, 1)), (33, 33, 64, (32, 32))],
)
def test_truncation_trims_the_longer_side_first(text, boxes, budget, expected):
    assert truncate_to_budget(text, boxes, budget) == expected


def test_image_transform_resizes_and_normalises_bgr():
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    transform = ImageTransform(shorter_side=30, longer_side=50, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0), bgr=True)
    pixels, scale = transform(image)
    assert pixels.shape == (3, 25, 50)  # 30 would make the longer side 60 > 50
    assert scale == (50 / 40, 25 / 20)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([30 - 1.0, 20 - 2.0, (10 - 3.0) / 2]))
    boxes = scale_boxes(np.array([[4.0, 2.0, 39.0, 30.0]], np.float32), scale, 50, 25)
    np.testing.assert_allclose(boxes, [[5.0, 2.5, 48.75, 24.0]])


def test_samples_have_cls_sep_the_whole_image_box_and_scaled_boxes(demo):
    reader = ConceptualCaptionsReader(demo.train)
    tokenizer = WordPieceTokenizer(demo.vocab)
    dataset = PretrainingDataset(reader, tokenizer, ImageTransform(shorter_side=128, longer_side=128))
    sample, example = dataset[0], reader[0]
    assert sample.text_ids[0] == tokenizer.cls_id and sample.text_ids[-1] == tokenizer.sep_id
    assert sample.word_index[0] == -1 and sample.word_index[-1] == -1
    pieces, words = tokenizer.encode_words(example.caption)
    assert sample.text_ids[1:-1].tolist() == pieces and sample.word_index[1:-1].tolist() == words
    assert sample.image.shape == (3, 128, 128) and sample.image_size == (128, 128)
    # the official whole-image box is (0, 0, w0 - 1, h0 - 1) of the 64 x 64 picture, then resized x 2: 63 x 2 = 126
    np.testing.assert_allclose(sample.boxes[0], [0, 0, 126, 126])
    np.testing.assert_allclose(sample.boxes[1:], np.clip(example.boxes * 2, 0, 127))
    assert np.all(sample.class_scores[0] == 0)
    np.testing.assert_allclose(sample.class_scores[1:], example.class_scores)
    assert len(sample.text_ids) + len(sample.boxes) <= 64


def test_a_records_length_is_its_caption_words_and_boxes_from_the_readers_count(demo):
    reader = ConceptualCaptionsReader(demo.train)
    from_reader = PretrainingDataset(reader, WordPieceTokenizer(demo.vocab))
    from_records = PretrainingDataset([reader[index] for index in range(len(reader))], WordPieceTokenizer(demo.vocab))
    lengths = [from_reader.length(index) for index in range(len(reader))]
    assert lengths == [from_records.length(index) for index in range(len(reader))]
    assert lengths == [len(reader[index].caption) + len(reader[index].boxes) for index in range(len(reader))]
    assert len(set(lengths)) > 3
    asked = []
    counted = reader.length
    reader.length = lambda index: asked.append(index) or counted(index)
    assert from_reader.length(5) == lengths[5] and asked == [5], "the reader's count, not the decoded record"


def test_blanking_and_dropping_are_reproducible(demo):
    dataset = PretrainingDataset(
        ConceptualCaptionsReader(demo.train), WordPieceTokenizer(demo.vocab), ImageTransform(64, 64),
        blank_image_probability=0.5, drop_caption_probability=0.5, seed=3,
    )
    blanked = [bool((dataset[i].image == 0).all()) and dataset[i].image_extent == (0, 0) for i in range(20)]
    dropped = [len(dataset[i].text_ids) == 2 for i in range(20)]
    assert 0 < sum(blanked) < 20 and 0 < sum(dropped) < 20
    assert blanked == [bool((dataset[i].image == 0).all()) for i in range(20)]


def test_precomputed_features_take_the_mean_as_the_whole_image():
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    example = ImageTextExample("rec", ["a", "b"], 10, 10, np.zeros((3, 4), np.float32), np.full((3, 2), 0.5, np.float32), features)

    class Words:
        cls_id, sep_id, mask_id, vocab_size = 1, 2, 3, 10

        def encode_words(self, words):
            return [5] * len(words), list(range(len(words)))

    sample = PretrainingDataset([example], Words(), None, max_elements=5).encode(example)
    # 4 tokens + 4 boxes to 5: text (tie) → 3, boxes → 3, text (tie) → 2, then 2 + 3 fits
    assert len(sample.text_ids) == 2 and len(sample.boxes) == 3
    np.testing.assert_allclose(sample.features[0], features.mean(0))  # mean of all 3, before truncation
    np.testing.assert_allclose(sample.features[1], features[0])


def test_collation_pads_to_the_longest_row_of_the_batch(demo):
    dataset = PretrainingDataset(ConceptualCaptionsReader(demo.train), WordPieceTokenizer(demo.vocab), ImageTransform(64, 64))
    samples = [dataset[i] for i in range(4)]
    batch = collate_pretraining(samples)
    assert batch.text_ids.shape[1] == max(len(s.text_ids) for s in samples)
    assert batch.boxes.shape[1] == max(len(s.boxes) for s in samples)
    assert batch.text_mask.sum(1).tolist() == [len(s.text_ids) for s in samples]
    assert batch.region_mask.sum(1).tolist() == [len(s.boxes) for s in samples]
    assert batch.images.shape == (4, 3, 64, 64) and batch.region_class_scores.shape[-1] == 5
    assert torch.all(batch.word_index[~batch.text_mask] == -1)


def test_text_corpus_chunks_are_64_pieces_with_word_indices(demo):
    tokenizer = WordPieceTokenizer(demo.vocab)
    chunks = TextCorpusChunks(demo.corpus, tokenizer, chunk_length=64)
    first = list(zip(range(5), chunks))
    assert len(first) == 5
    for _, chunk in first:
        assert len(chunk.text_ids) == 64 and chunk.word_index[0] == 0
        assert np.all(np.diff(chunk.word_index) >= 0)
        assert tokenizer.cls_id not in chunk.text_ids.tolist()
    batch = collate_text([chunk for _, chunk in first])
    assert batch.text_ids.shape == (5, 64) and batch.boxes.shape == (5, 0, 4)


def test_whole_word_units_are_basic_tokens_with_punctuation_split_off(tmp_path):
    # official: basic_tokenizer.tokenize(' '.join(caption)) → units, then WordPiece per unit
    # "a dog, running." → units a | dog | , | running | . ; "running" → run ##ning.
    # vocab ids: [PAD] 0 [UNK] 1 [CLS] 2 [SEP] 3 [MASK] 4 a 5 dog 6 , 7 run 8 ##ning 9 . 10
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", ",", "run", "##ning", "."]) + "\n")
    tokenizer = WordPieceTokenizer(vocab)
    pieces, words = encode_caption(tokenizer, ["a", "dog,", "running."])
    assert pieces == [5, 6, 7, 8, 9, 10]
    assert words == [0, 1, 2, 3, 3, 4], "',' and '.' are units of their own; run and ##ning share one"
    example = ImageTextExample("rec", ["A", "dog,", "running."], 10, 10, np.zeros((1, 4), np.float32), np.full((1, 2), 0.5, np.float32), np.ones((1, 3), np.float32))
    sample = PretrainingDataset([example], tokenizer, None).encode(example)
    assert sample.text_ids.tolist() == [2, 5, 6, 7, 8, 9, 10, 3]
    assert sample.word_index.tolist() == [-1, 0, 1, 2, 3, 3, 4, -1]
