import json

import numpy as np
import pytest
import torch

from vlblocks.data.datasets.pretraining import PretrainingDataset
from vlblocks.data.demo.scenes import write_demo_dataset
from vlblocks.data.errors import DataError
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.pipeline.flip import flip_boxes, flip_words
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.sampling import LengthBucketSampler
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), train=30, val=10, seed=0)


def test_flip_maps_boxes_as_the_official_random_horizontal_flip_and_swaps_left_and_right():
    # official transforms.RandomHorizontalFlip: boxes[:, [0, 2]] = w - 1 - boxes[:, [2, 0]]
    # w = 20: [0, 2, 9, 5] -> x1 = 19 - 9 = 10, x2 = 19 - 0 = 19; [10, 0, 19, 3] -> 0, 9
    # w = 10: [2.5, 1, 7.25, 4] -> x1 = 9 - 7.25 = 1.75, x2 = 9 - 2.5 = 6.5 (y untouched)
    boxes = np.array([[0.0, 2.0, 9.0, 5.0], [10.0, 0.0, 19.0, 3.0]], np.float32)
    np.testing.assert_allclose(flip_boxes(boxes, 20), [[10.0, 2.0, 19.0, 5.0], [0.0, 0.0, 9.0, 3.0]])
    np.testing.assert_allclose(flip_boxes(np.array([[2.5, 1.0, 7.25, 4.0]], np.float32), 10), [[1.75, 1.0, 6.5, 4.0]])
    assert flip_words(["the", "circle", "is", "left", "of", "the", "Right", "square"]) == ["the", "circle", "is", "right", "of", "the", "left", "square"]


def test_flipped_samples_mirror_pixels_and_boxes_and_keep_the_caption_by_default(demo):
    # the official pre-training datasets never swap "left"/"right": only the pixels and boxes flip
    reader, tokenizer = ConceptualCaptionsReader(demo.train), WordPieceTokenizer(demo.vocab)
    plain = PretrainingDataset(reader, tokenizer, ImageTransform(64, 64))
    flipped = PretrainingDataset(reader, tokenizer, ImageTransform(64, 64), flip_probability=1.0)
    swapping = PretrainingDataset(reader, tokenizer, ImageTransform(64, 64), flip_probability=1.0, swap_flipped_words=True)
    sided = 0
    for index in range(10):
        a, b, c = plain[index], flipped[index], swapping[index]
        assert torch.equal(b.image, a.image.flip(-1))
        np.testing.assert_allclose(b.boxes, flip_boxes(a.boxes, 64))
        assert np.array_equal(a.text_ids, b.text_ids)
        words = reader[index].caption
        if "left" in words or "right" in words:
            sided += 1
            assert not np.array_equal(a.text_ids, c.text_ids)
            assert c.text_ids.tolist()[1:-1] == tokenizer.encode_words(flip_words(words))[0]
    assert sided > 0, "the demo captions name sides"


def test_precomputed_samples_flip_their_boxes_not_their_features():
    # official: RandomHorizontalFlip runs on the boxes with image None (features stay as computed).
    # Here in the original frame, w0 = 10: whole image [0, 0, 9, 7] -> [0, 0, 9, 7];
    # box [1, 2, 4, 6] -> [9 - 4, 2, 9 - 1, 6] = [5, 2, 8, 6]
    features = np.arange(8, dtype=np.float32).reshape(1, 8)
    example = ImageTextExample("rec", ["a"], 10, 8, np.array([[1.0, 2.0, 4.0, 6.0]], np.float32), np.full((1, 2), 0.5, np.float32), features)
    sample = PretrainingDataset([example], _OnePiecePerWord(), None, flip_probability=1.0).encode(example)
    np.testing.assert_allclose(sample.boxes, [[0.0, 0.0, 9.0, 7.0], [5.0, 2.0, 8.0, 6.0]])
    np.testing.assert_allclose(sample.features, [features[0], features[0]])


class _OnePiecePerWord:
    cls_id, sep_id, mask_id, vocab_size = 1, 2, 3, 10

    def encode_words(self, words):
        return [5] * len(words), list(range(len(words)))


def test_bad_records_stop_by_default_and_are_skipped_and_counted_on_request(demo, tmp_path):
    lines = demo.train.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["caption"] = []
    lines[1] = json.dumps(broken)
    for name in ("train_image.zip", "train_frcnn.zip"):
        (tmp_path / name).write_bytes((demo.train.parent / name).read_bytes())
    annotations = tmp_path / "train_frcnn.json"
    annotations.write_text("\n".join(lines) + "\n")
    tokenizer = WordPieceTokenizer(demo.vocab)
    strict = PretrainingDataset(ConceptualCaptionsReader(annotations), tokenizer, ImageTransform(64, 64))
    with pytest.raises(DataError, match="line 2"):
        strict[1]
    lenient = PretrainingDataset(ConceptualCaptionsReader(annotations), tokenizer, ImageTransform(64, 64), skip_bad_records=True)
    samples = [lenient[i] for i in range(len(lenient))]
    assert len(samples) == 30 and len(lenient.skipped) == 1 and "line 2" in lenient.skipped[0]
    assert np.array_equal(samples[1].text_ids, strict[2].text_ids), "the next record stands in for the bad one"


def test_length_buckets_group_similar_lengths_and_cover_everything():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53] * 10
    sampler = LengthBucketSampler(lengths, batch_size=4, pool_batches=20, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    assert sorted(i for batch in batches for i in batch) == list(range(80))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spreads) <= 3, "each batch holds only short or only long samples"
    assert list(LengthBucketSampler(lengths, 4, seed=0)) == batches and list(sampler) != batches
    assert len(LengthBucketSampler(lengths[:30], 4, pool_batches=2, drop_last=False)) == 8
