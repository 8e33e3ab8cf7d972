import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlblocks.data.datasets.vcr import VCRDataset, truncate_choices, truncate_pair, truncate_rationales, vcr_data
from vlblocks.data.errors import DataError
from vlblocks.data.formats.coco_classes import COCO_CLASS_INDEX, COCO_CLASSES
from vlblocks.data.formats.vcr import VCRReader, instance_masks, read_vcr_metadata
from vlblocks.data.pipeline.collate import collate_choice_groups
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "what", "is", "doing", "?", ".", "casey", "riley", "jessie", "and", "eating", "sleep", "##ing",
    "drives", "the", "car", "at", "dining", "table", "because", "smiles", "no", "yes", "where", "jackie",
]  # fmt: skip
OBJECTS = ["person", "person", "car", "dining table"]
# 80 x 60 pixels; ImageTransform(30, 100) halves it to 40 x 30.
METADATA = {
    "boxes": [[10, 20, 30, 50, 0.9], [0, 0, 79, 59, 0.8], [40, 10, 70, 40, 0.7], [5, 30, 60, 59, 0.6]],
    "segms": [[[[10, 20], [30, 20], [30, 50]]], [], [[[40, 10], [70, 10], [70, 40]]], []],
    "names": OBJECTS,
    "width": 80,
    "height": 60,
}
TRANSFORM = ImageTransform(shorter_side=30, longer_side=100)


def record(annot_id="train-0", **overrides) -> dict:
    """One line of a VCR jsonl file, with every key of the public release."""
    result = {
        "movie": "1054_Harry_Potter", "objects": list(OBJECTS), "interesting_scores": [0],
        "answer_likelihood": "likely", "img_fn": "lsmdc_1054/a.jpg", "metadata_fn": "lsmdc_1054/a.json",
        "answer_orig": "x", "question_orig": "x", "rationale_orig": "x",
        "question": ["What", "is", [0], "doing", "?"],
        "answer_match_iter": [0, 1, 2, 3], "answer_sources": [0, 1, 2, 3],
        "answer_choices": [[[1], "is", "eating", "."], ["Sleeping", "."], [[0], "drives", "the", [2], "."],
                           ["at", "the", [3]]],
        "answer_label": 2,
        "rationale_choices": [["Because", "."], [[1], "smiles"], ["no"], ["yes", [0, 2]]],
        "rationale_sources": [0, 1, 2, 3], "rationale_match_iter": [0, 1, 2, 3], "rationale_label": 1,
        "img_id": annot_id, "question_number": 0, "annot_id": annot_id, "match_fold": "x", "match_index": 0,
    }  # fmt: skip
    result.update(overrides)
    return result


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def unlabelled_record(annot_id: str = "test-0") -> dict:
    """A test-split line: no answer or rationale label."""
    unlabelled = record(annot_id)
    del unlabelled["answer_label"], unlabelled["rationale_label"]
    return unlabelled


@pytest.fixture
def root(tmp_path) -> Path:
    """A VCR folder: train (2 questions, 2 images), val, test (unlabelled), vocab.txt."""
    images = tmp_path / "vcr1images"
    for movie, name, size in (("lsmdc_1054", "a", (80, 60)), ("movieclips_x", "b", (100, 50))):
        (images / movie).mkdir(parents=True)
        Image.new("RGB", size, (10, 200, 30)).save(images / movie / f"{name}.jpg")
        metadata = dict(METADATA, width=size[0], height=size[1])
        (images / movie / f"{name}.json").write_text(json.dumps(metadata))
    second = record("train-1", img_fn="movieclips_x/b.jpg", metadata_fn="movieclips_x/b.json", answer_label=0)
    write_lines(tmp_path / "train.jsonl", [record(), second])
    write_lines(tmp_path / "val.jsonl", [record("val-0")])
    write_lines(tmp_path / "test.jsonl", [unlabelled_record()])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token in VOCAB))
    return tmp_path


def ids(text: str) -> list[int]:
    return [VOCAB.index(token) for token in text.split()]


def dataset(root: Path, split: str = "train", task: str = "q2a", **kwargs) -> VCRDataset:
    reader = VCRReader(root / f"{split}.jsonl", root / "vcr1images")
    return VCRDataset(reader, WordPieceTokenizer(root / "vocab.txt"), TRANSFORM, task, **kwargs)


def test_coco_classes_are_background_then_the_80_categories_in_order():
    assert len(COCO_CLASSES) == 81 and len(set(COCO_CLASSES)) == 81
    assert COCO_CLASSES[:6] == ("__background__", "person", "bicycle", "car", "motorcycle", "airplane")
    assert COCO_CLASSES[10] == "traffic light" and COCO_CLASSES[61] == "dining table"
    assert COCO_CLASSES[80] == "toothbrush" and COCO_CLASS_INDEX["tv"] == 63


def test_q2a_rows_have_question_then_choice_with_segments_and_labels(root):
    rows = dataset(root)[0]
    assert len(rows) == 4
    third = rows[2]
    np.testing.assert_array_equal(
        third.text_ids, ids("[CLS] what is casey doing ? [SEP] casey drives the car . [SEP]")
    )
    np.testing.assert_array_equal(third.segment_ids, [0] * 7 + [1] * 6)
    np.testing.assert_array_equal(third.word_index, [-1, 0, 1, 2, 3, 4, -1, 5, 6, 7, 8, 9, -1])
    # casey = detection 0 (region 1), car = detection 2 (region 3).
    np.testing.assert_array_equal(third.token_regions, [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 3, 0, 0])
    for row in rows:
        assert row.text_ids.dtype == np.int64 and row.token_regions.dtype == np.int64
    # A two-piece word: both pieces see its word's region and share its index.
    second = rows[1]
    np.testing.assert_array_equal(second.text_ids, ids("[CLS] what is casey doing ? [SEP] sleep ##ing . [SEP]"))
    np.testing.assert_array_equal(second.word_index, [-1, 0, 1, 2, 3, 4, -1, 5, 5, 6, -1])
    np.testing.assert_array_equal(rows[3].token_regions, [0, 0, 0, 1, 0, 0, 0, 0, 0, 4, 4, 0])
    assert [row.choice_label for row in rows] == [0.0, 0.0, 1.0, 0.0]
    assert all(row.class_scores is None and row.features is None for row in rows)


def test_qa2r_question_carries_the_right_answer_and_its_grounding(root):
    rows = dataset(root, task="qa2r")[0]
    smiles = rows[1]
    np.testing.assert_array_equal(
        smiles.text_ids,
        ids("[CLS] what is casey doing ? casey drives the car . [SEP] riley smiles [SEP]"),
    )
    np.testing.assert_array_equal(smiles.segment_ids, [0] * 12 + [1] * 3)
    np.testing.assert_array_equal(smiles.word_index, [-1, *range(10), -1, 10, 11, -1])
    np.testing.assert_array_equal(smiles.token_regions, [0, 0, 0, 1, 0, 0, 1, 0, 0, 3, 0, 0, 2, 0, 0])
    np.testing.assert_array_equal(
        rows[3].token_regions[12:], [0, 1, 0, 3, 0]  # "yes casey and car [SEP]"
    )
    assert [row.choice_label for row in rows] == [0.0, 1.0, 0.0, 0.0]
    # The second question's right answer is choice 0 ("[1] is eating ."); the person-name
    # counter runs on from question 0's two people: objects 0 and 1 are Jessie and Jackie.
    np.testing.assert_array_equal(
        dataset(root, task="qa2r")[1][0].text_ids[:11], ids("[CLS] what is jessie doing ? jackie is eating . [SEP]")
    )


@pytest.mark.parametrize(
    "question, choice, budget, kept",
    # (5, 3, 5): 8 > 5, 3 > 5 no: q 4; q 3; tie 3 = 3: q 2 -> (2, 3). (4, 4, 7): tie: q 3.
    # (2, 2, 0): tie q 1; 2 > 1: c 1; tie q 0; c 0.
    [(5, 3, 8, (5, 3)), (5, 3, 5, (2, 3)), (4, 4, 7, (3, 4)), (3, 3, 4, (2, 2)), (10, 1, 4, (3, 1)), (0, 9, 4, (0, 4)), (2, 2, 0, (0, 0))],
)
def test_truncate_pair_drops_from_the_longer_and_from_the_question_on_ties(question, choice, budget, kept):
    assert truncate_pair(question, choice, budget) == kept


def test_truncate_choices_shares_one_question_trimmed_in_choice_order():
    # q 10, choices [1, 7], budget 8. Choice 0: q drops to 7 (7 + 1 = 8). Choice 1: 7 + 7: tie
    # q 6; c 6; q 5; c 5; q 4; c 4 = 8. Every row uses q 4, so row 0 ends at 4 + 1 = 5 < 8.
    assert truncate_choices(10, [1, 7], 8) == (4, [1, 4])
    assert truncate_choices(3, [2, 2, 2, 2], 8) == (3, [2, 2, 2, 2])


def test_truncate_rationales_follows_the_official_qa2r_order():
    # q 6, a 3, r [4, 12], budget 10. r0: 13 > 10, 4 > 9 no: q 5, 4, 3 -> 10. r1: 12 > 6 ... r
    # drops to 6 (3 + 3 + 6 = 12); 6 > 6 no: q 2; 6 > 5: r 5 -> 10.
    assert truncate_rationales(6, 3, [4, 12], 10) == (2, 3, [4, 5])
    # q stops at 1, then the answer is trimmed: a 5 -> 4, 3, 2 (2 > 3 no), 1: 1 + 1 + 2 = 4.
    assert truncate_rationales(1, 5, [2], 4) == (1, 1, [2])
    # A rationale longer than q + a is trimmed first: r 5 -> 4, 3, 2.
    assert truncate_rationales(1, 1, [5], 4) == (1, 1, [2])


def test_q2a_rows_are_truncated_as_the_official_code(root):
    rows = dataset(root, max_text_pieces=5)[0]
    # q 5 pieces, choices 4, 3, 5, 4. Choice 0: 4 > 5 no: q 4; 4 > 4 no: q 3; 4 > 3: c 3; tie:
    # q 2. Choices 1..3 then fit 5 - 2 = 3 pieces. Every row: "what is".
    texts = [
        "[CLS] what is [SEP] riley is eating [SEP]",
        "[CLS] what is [SEP] sleep ##ing . [SEP]",
        "[CLS] what is [SEP] casey drives the [SEP]",
        "[CLS] what is [SEP] at the dining [SEP]",
    ]
    for row, text in zip(rows, texts):
        np.testing.assert_array_equal(row.text_ids, ids(text))
    short = rows[1]
    np.testing.assert_array_equal(short.segment_ids, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(short.word_index, [-1, 0, 1, -1, 5, 5, 6, -1])
    np.testing.assert_array_equal(rows[2].token_regions, [0, 0, 0, 0, 1, 0, 0, 0])


def test_qa2r_rows_trim_question_then_answer_as_the_official_code(root):
    rows = dataset(root, task="qa2r", max_text_pieces=8)[0]
    # q 5 ("what is casey doing ?"), a 5 ("casey drives the car ."), r 2, 2, 1, 4. r0: the
    # question drops to 1 (1 + 5 + 2 = 8). r3: 1 + 5 + 4 = 10: 4 > 6 no, q is 1: a 4; a 3 -> 8.
    np.testing.assert_array_equal(rows[0].text_ids, ids("[CLS] what casey drives the [SEP] because . [SEP]"))
    np.testing.assert_array_equal(rows[3].text_ids, ids("[CLS] what casey drives the [SEP] yes casey and car [SEP]"))
    np.testing.assert_array_equal(rows[3].word_index, [-1, 0, 5, 6, 7, -1, 10, 11, 12, 13, -1])
    np.testing.assert_array_equal(rows[3].token_regions, [0, 0, 1, 0, 0, 0, 0, 1, 0, 3, 0])
    np.testing.assert_array_equal(rows[3].segment_ids, [0] * 6 + [1] * 5)


def test_boxes_are_scaled_with_the_whole_image_first_and_shared(root):
    rows = dataset(root)[0]
    first = rows[0]
    assert first.image.shape == (3, 30, 40) and first.image_size == (40, 30)
    expected = [[0, 0, 39, 29], [5, 10, 15, 25], [0, 0, 39, 29], [20, 5, 35, 20], [2.5, 15, 30, 29]]
    np.testing.assert_allclose(first.boxes, expected)
    assert first.boxes.dtype == np.float32
    np.testing.assert_array_equal(first.region_classes, [0, 1, 1, 3, 61])
    assert first.region_classes.dtype == np.int64
    assert first.region_masks.shape == (5, 14, 14) and np.all(first.region_masks[0] == 1)
    np.testing.assert_array_equal(first.region_masks[1:], instance_masks(read_vcr_metadata(root / "vcr1images" / "lsmdc_1054" / "a.json")))
    for row in rows[1:]:
        assert row.image is None and row.image_size == (40, 30)
        np.testing.assert_array_equal(row.boxes, first.boxes)
        np.testing.assert_array_equal(row.region_classes, first.region_classes)
    # 100 x 50 → 60 x 30 (scale 0.6).
    other = dataset(root)[1][0]
    assert other.image_size == (60, 30)
    np.testing.assert_allclose(other.boxes[0], [0, 0, 59, 29])
    np.testing.assert_allclose(other.boxes[1], [6, 12, 18, 29])


def test_whole_image_box_is_the_original_image_box_scaled_as_in_the_official_code(root):
    # Official: [0, 0, w0 - 1, h0 - 1] is added before Resize. 80 x 60 doubled to 160 x 120:
    # [0, 0, 79, 59] x 2 = [0, 0, 158, 118] (not [0, 0, 159, 119]).
    reader = VCRReader(root / "train.jsonl", root / "vcr1images")
    tokenizer = WordPieceTokenizer(root / "vocab.txt")
    rows = VCRDataset(reader, tokenizer, ImageTransform(shorter_side=120, longer_side=400))[0]
    np.testing.assert_allclose(rows[0].boxes[0], [0, 0, 158, 118])
    # Flipped: x -> 159 - x, x1 and x2 swapped: [159 - 158, 0, 159 - 0, 118].
    flipped = VCRDataset(reader, tokenizer, ImageTransform(shorter_side=120, longer_side=400), flip_probability=1.0)[0]
    np.testing.assert_allclose(flipped[0].boxes[0], [1, 0, 159, 118])


def test_flip_mirrors_image_boxes_and_masks_of_all_four_rows_and_keeps_words(root):
    plain = dataset(root)[0]
    flipped = dataset(root, flip_probability=1.0)[0]
    # 40 x 30 image: detection 0 [5, 10, 15, 25] -> [39 - 15, 10, 39 - 5, 25].
    np.testing.assert_allclose(flipped[0].boxes[1], [24, 10, 34, 25])
    np.testing.assert_allclose(flipped[0].boxes[0], [0, 0, 39, 29])
    np.testing.assert_array_equal(flipped[0].image.numpy(), plain[0].image.numpy()[:, :, ::-1])
    np.testing.assert_array_equal(flipped[0].region_masks, plain[0].region_masks[:, :, ::-1])
    for row, before in zip(flipped, plain):
        np.testing.assert_array_equal(row.boxes, flipped[0].boxes)
        np.testing.assert_array_equal(row.region_masks, flipped[0].region_masks)
        np.testing.assert_array_equal(row.text_ids, before.text_ids)  # no word is swapped
    never = dataset(root, flip_probability=0.0)
    assert not any(never.flipped(i) for i in range(50))
    half = dataset(root, flip_probability=0.5, seed=3)
    draws = [half.flipped(i) for i in range(200)]
    assert draws == [half.flipped(i) for i in range(200)] and 60 < sum(draws) < 140


def test_vcr_data_flips_only_the_training_split(root):
    data = vcr_data(str(root), vocab=str(root / "vocab.txt"), image_transform=TRANSFORM, flip_probability=1.0)
    assert data.train.flip_probability == 1.0 and data.val.flip_probability == 0.0
    assert vcr_data(str(root), vocab=str(root / "vocab.txt")).train.image_transform.longer_side == 1200


def test_test_split_has_no_labels_for_q2a_and_fails_for_qa2r(root):
    rows = dataset(root, "test")[0]
    assert [row.choice_label for row in rows] == [None] * 4
    qa2r = dataset(root, "test", task="qa2r")
    for read in (lambda: qa2r[0], lambda: qa2r.length(0)):
        with pytest.raises(DataError) as error:
            read()
        assert "test.jsonl line 1 (annot_id 'test-0')" in str(error.value)
        assert "field 'answer_label'" in str(error.value)


def test_unknown_object_class_names_the_record(root):
    write_lines(root / "train.jsonl", [record("train-7", objects=["person", "person", "car", "unicorn"])])
    with pytest.raises(DataError, match=r"annot_id 'train-7'\), field 'objects': object 3 'unicorn'"):
        dataset(root)[0]


def test_length_is_question_plus_longest_choice(root):
    assert dataset(root).length(0) == 5 + 5  # "casey drives the car ."
    assert dataset(root, task="qa2r").length(0) == 10 + 4  # question + answer, "yes casey and car"


def test_unknown_task_is_rejected(root):
    with pytest.raises(ValueError, match="'q2r'"):
        dataset(root, task="q2r")


def test_collate_two_questions_shares_each_image_over_its_four_rows(root):
    data = dataset(root)
    batch = collate_choice_groups([data[0], data[1]])
    assert batch.text_ids.shape[0] == 8 and batch.rows_per_image == 4
    assert batch.images.shape == (2, 3, 30, 60)
    assert batch.boxes.shape == (8, 5, 4) and batch.region_classes.shape == (8, 5)
    assert batch.choice_labels.tolist() == [0, 0, 1, 0, 1, 0, 0, 0]
    assert batch.token_region_index is not None and batch.segment_ids.max() == 1
    assert batch.image_sizes[4].tolist() == [60, 30]


def test_vcr_data_builds_both_splits(root):
    data = vcr_data(str(root), task="qa2r", vocab=str(root / "vocab.txt"), image_transform=TRANSFORM)
    assert len(data.train) == 2 and len(data.val) == 1
    assert data.train.task == "qa2r" and data.collate is collate_choice_groups
    assert "VCR qa2r" in data.description and "val.jsonl" in data.description
    assert len(data.val[0]) == 4
    assert len(vcr_data(str(root), val_split="test", vocab=str(root / "vocab.txt")).val) == 1


def test_vcr_data_names_the_binding_of_what_is_missing(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vcr_data\.root"):
        vcr_data(str(tmp_path / "nowhere"), vocab=str(root / "vocab.txt"))
    with pytest.raises(ValueError, match=r"vcr_data\.vocab"):
        vcr_data(str(root))
    with pytest.raises(FileNotFoundError, match=r"vcr_data\.val_split"):
        vcr_data(str(root), val_split="dev", vocab=str(root / "vocab.txt"))


def test_vcr_data_reads_images_from_a_zip_folder(root):
    with zipfile.ZipFile(root / "vcr1images.zip", "w") as archive:
        for path in sorted((root / "vcr1images").rglob("*.*")):
            archive.write(path, path.relative_to(root).as_posix())
    shutil.rmtree(root / "vcr1images")
    data = vcr_data(str(root), images="vcr1images.zip@/vcr1images", vocab=str(root / "vocab.txt"), image_transform=TRANSFORM)
    assert data.train[1][0].image_size == (60, 30)
    with pytest.raises(FileNotFoundError, match=r"vcr_data\.images"):
        vcr_data(str(root), vocab=str(root / "vocab.txt"))
