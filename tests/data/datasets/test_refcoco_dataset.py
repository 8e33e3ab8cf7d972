"""RefCocoDataset / refcoco_data on a tiny RefCOCO+ tree in the official file formats."""

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlblocks.data.datasets.refcoco import RefCocoDataset, refcoco_data
from vlblocks.data.errors import DataError
from vlblocks.data.formats.refcoco import RefCocoReader
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "man", "on", "left", "the", "big", "dog", "##s", "right", "##most"]
CLS, SEP = 2, 3
LEFT, RIGHT, MOST = 7, 12, 13
PROPOSALS = "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json"
# 40 x 20 images; shorter side 10 halves them to 20 x 10.
HALF = ImageTransform(shorter_side=10, longer_side=100)

REFS = [
    {"sent_ids": [0], "file_name": "COCO_train2014_000000000001_10.jpg", "ann_id": 10, "ref_id": 0,
     "image_id": 1, "split": "train", "category_id": 1,
     "sentences": [{"tokens": ["man", "on", "left"], "raw": "Man on left", "sent_id": 0, "sent": "man on left"}]},
    {"sent_ids": [1], "file_name": "COCO_train2014_000000000002_20.jpg", "ann_id": 20, "ref_id": 1,
     "image_id": 2, "split": "val", "category_id": 18,
     "sentences": [{"tokens": ["the", "big", "dogs"], "raw": "The big dogs", "sent_id": 1, "sent": "the big dogs"}]},
]
IMAGES = [
    {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 20},
    {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 40, "height": 20},
]


def annotation(ann_id: int, image_id: int, bbox: list) -> dict:
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": 1, "segmentation": [[]],
            "area": bbox[2] * bbox[3], "iscrowd": 0}


ANNOTATIONS = [
    annotation(10, 1, [4, 2, 10, 8]),  # target of ref 0: [4, 2, 14, 10], 11 x 9 pixels with +1
    annotation(11, 1, [10, 2, 10, 8]),  # IoU 45 / 153 with the target
    annotation(12, 1, [20, 10, 10, 5]),  # disjoint
    annotation(20, 2, [1, 1, 36, 17]),  # target of ref 1: [1, 1, 37, 18], 666 of the image's 800 pixels
]
DETECTIONS = [
    # IoU 7.5 / 14.5 > 0.5 with +1 widths; 6.5 / 13.5 < 0.5 without.
    {"det_id": 500, "image_id": 1, "category_id": 1, "score": 0.9, "box": [7.5, 2, 10, 8]},
    # [4, 2, 14, 5.5]: inside the target, 11 x 4.5 = half of it in original pixels: IoU exactly 0.5.
    {"det_id": 501, "image_id": 1, "category_id": 1, "score": 0.8, "box": [4, 2, 10, 3.5]},
    {"det_id": 600, "image_id": 2, "category_id": 18, "score": 0.6, "box": [0, 0, 10, 10]},
]


def write_jpeg(path: Path, size: tuple[int, int] = (40, 20), orientation: int | None = None) -> None:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (200, 30, 30)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif)


@pytest.fixture
def tree(tmp_path):
    """(data root, vocab path) in the official layout."""
    root = tmp_path / "coco"
    (root / "refcoco+" / "proposal").mkdir(parents=True)
    (root / "train2014").mkdir()
    with open(root / "refcoco+" / "refs(unc).p", "wb") as handle:
        pickle.dump(REFS, handle, protocol=2)
    instances = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": [{"id": 1, "name": "person"}]}
    (root / "refcoco+" / "instances.json").write_text(json.dumps(instances))
    (root / PROPOSALS).write_text(json.dumps(DETECTIONS))
    for image in IMAGES:
        write_jpeg(root / "train2014" / image["file_name"])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return root, vocab


def gt_dataset(root: Path, vocab: Path, split: str, transform=HALF, add_annotation_boxes=False, **options) -> RefCocoDataset:
    reader = RefCocoReader(root / "refcoco+" / "refs(unc).p", root / "refcoco+" / "instances.json", split)
    return RefCocoDataset(reader, root / "train2014", WordPieceTokenizer(vocab), transform, add_annotation_boxes, **options)


def test_ground_truth_sample(tree):
    root, vocab = tree
    sample = gt_dataset(root, vocab, "train")[0]
    np.testing.assert_array_equal(sample.text_ids, [CLS, 5, 6, 7, SEP])
    np.testing.assert_array_equal(sample.word_index, [-1, 0, 1, 2, -1])
    assert sample.segment_ids is None and sample.token_regions is None
    assert sample.class_scores is None and sample.features is None
    assert sample.image.shape == (3, 10, 20) and sample.image_size == (20, 10)
    # Whole image [0, 0, 39, 19] * 0.5 = [0, 0, 19.5, 9.5], clamped to the 20 x 10 image.
    expected = [[0, 0, 19, 9], [2, 1, 7, 5], [5, 1, 10, 5], [10, 5, 15, 7.5]]
    np.testing.assert_array_equal(sample.boxes, expected)
    assert sample.boxes.dtype == np.float32
    # Only the target annotation itself overlaps the target > 0.5.
    np.testing.assert_array_equal(sample.region_labels, [0, 1, 0, 0])
    assert sample.region_labels.dtype == np.float32


def test_wordpieces_and_whole_image_box_matching_the_target(tree):
    root, vocab = tree
    sample = gt_dataset(root, vocab, "val")[0]
    np.testing.assert_array_equal(sample.text_ids, [CLS, 8, 9, 10, 11, SEP])
    np.testing.assert_array_equal(sample.word_index, [-1, 0, 1, 2, 2, -1])
    # IoU of [0, 0, 39, 19] with [1, 1, 37, 18] is 666 / 800.
    np.testing.assert_array_equal(sample.region_labels, [1, 1])
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 19, 9], [0.5, 0.5, 18.5, 9]])


def test_whole_image_box_is_scaled_not_rebuilt(tree):
    root, vocab = tree
    sample = gt_dataset(root, vocab, "train", ImageTransform(shorter_side=40, longer_side=100))[0]
    assert sample.image_size == (80, 40)
    np.testing.assert_array_equal(sample.boxes[0], [0, 0, 78, 38])


def test_add_annotation_boxes_appends_every_annotation_of_the_image(tree):
    root, vocab = tree
    dataset = gt_dataset(root, vocab, "train", add_annotation_boxes=True)
    sample = dataset[0]
    # Candidates (annotations 10, 11, 12) then the same annotations again: no deduplication.
    expected = [[0, 0, 19, 9], [2, 1, 7, 5], [5, 1, 10, 5], [10, 5, 15, 7.5], [2, 1, 7, 5], [5, 1, 10, 5], [10, 5, 15, 7.5]]
    np.testing.assert_array_equal(sample.boxes, expected)
    np.testing.assert_array_equal(sample.region_labels, [0, 1, 0, 0, 1, 0, 0])
    assert dataset.length(0) == 3 + 7
    assert gt_dataset(root, vocab, "train").length(0) == 3 + 4


def test_detected_training_regions_are_proposals_then_every_ground_truth_box(tree):
    # VL-BERT's "proposal+gt" training boxes: image box, the 2 proposals, the image's 3 COCO
    # annotations (file order); "proposal" for validation. Halved (HALF), target [2, 1, 7, 5] has
    # 6 x 5 = 30 pixels with +1 widths.
    root, vocab = tree
    data = refcoco_data(root=str(root), boxes="detected", vocab=str(vocab), image_transform=HALF, flip_probability=0.0)
    assert len(data.train) == 1 and len(data.val) == 1
    assert data.collate is collate_pretraining
    train = data.train[0]
    np.testing.assert_array_equal(
        train.boxes,
        [[0, 0, 19, 9], [3.75, 1, 8.75, 5], [2, 1, 7, 2.75], [2, 1, 7, 5], [5, 1, 10, 5], [10, 5, 15, 7.5]],
    )
    # image box: 30 / (20 x 10) = 0.15; det 500: 4.25 x 5 = 21.25 / (30 + 30 - 21.25) = 0.548;
    # det 501: 6 x 2.75 = 16.5 inside the target: 16.5 / 30 = 0.55 (labels use the resized boxes,
    # as VL-BERT does; in original pixels it was exactly 0.5, not positive); annotation 10 is the
    # target: 1; annotation 11: 3 x 5 = 15 / 45 = 0.33; annotation 12: disjoint.
    np.testing.assert_array_equal(train.region_labels, [0, 1, 1, 1, 0, 0])
    assert data.train.length(0) == 3 + 1 + 2 + 3
    val = data.val[0]
    np.testing.assert_array_equal(val.boxes, [[0, 0, 19, 9], [0, 0, 5, 5]])
    np.testing.assert_array_equal(val.region_labels, [1, 0])


def test_ground_truth_boxes_from_the_coco_instances_file(tree):
    # VL-BERT reads the image's boxes from annotations/instances_train2014.json (here with
    # annotation 12 first and 11 missing).
    root, vocab = tree
    (root / "annotations").mkdir()
    coco = {"images": IMAGES, "annotations": [ANNOTATIONS[2], ANNOTATIONS[0], ANNOTATIONS[3]], "categories": []}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(coco))
    data = refcoco_data(root=str(root), vocab=str(vocab), image_transform=HALF, flip_probability=0.0,
                        coco_instances="annotations/instances_train2014.json")
    train = data.train[0]
    np.testing.assert_array_equal(train.boxes, [[0, 0, 19, 9], [10, 5, 15, 7.5], [2, 1, 7, 5]])
    np.testing.assert_array_equal(train.region_labels, [0, 0, 1])


def test_flipped_sample_mirrors_pixels_boxes_and_swaps_left_right_pieces(tree):
    root, vocab = tree
    dataset = gt_dataset(root, vocab, "train")
    expression = dataset.reader[0]  # "man on left"
    flipped = dataset.encode(expression, flip=True)
    np.testing.assert_array_equal(flipped.text_ids, [CLS, 5, 6, RIGHT, SEP])
    np.testing.assert_array_equal(flipped.word_index, [-1, 0, 1, 2, -1])
    # Resized width 20: x -> 19 - x, x1 and x2 trading places.
    # Unflipped [[0, 0, 19, 9], [2, 1, 7, 5], [5, 1, 10, 5], [10, 5, 15, 7.5]].
    np.testing.assert_array_equal(flipped.boxes, [[0, 0, 19, 9], [12, 1, 17, 5], [9, 1, 14, 5], [4, 5, 9, 7.5]])
    np.testing.assert_array_equal(flipped.region_labels, [0, 1, 0, 0])
    # The image's left half is red (200, 30, 30): after the flip the right half is. BGR order.
    assert abs(int(flipped.image[2, 5, 18]) - 200) <= 8 and int(flipped.image[2, 5, 1]) <= 8
    plain = dataset.encode(expression, flip=False)
    assert abs(int(plain.image[2, 5, 1]) - 200) <= 8


def test_flip_swaps_whole_pieces_not_words(tree):
    # VL-BERT's flip_tokens compares WordPieces: "leftmost" = left ##most -> right ##most, and
    # "right" -> "left"; "##most" and other pieces stay.
    root, vocab = tree
    dataset = gt_dataset(root, vocab, "train")
    expression = dataclasses.replace(dataset.reader[0], tokens=["leftmost", "man", "right"])
    sample = dataset.encode(expression, flip=True)
    np.testing.assert_array_equal(sample.text_ids, [CLS, RIGHT, MOST, 5, LEFT, SEP])
    np.testing.assert_array_equal(sample.word_index, [-1, 0, 0, 1, 2, -1])


def test_flip_is_drawn_per_index_for_training_only(tree):
    # Sample 0 with seed 0 draws sample_random(0, 0, 0).random() = 0.8742 in epoch 0 and 0.8710
    # in epoch 1: flipped when the probability is above the draw.
    root, vocab = tree
    assert sample_random(0, 0, 0).random() == pytest.approx(0.8741515) and sample_random(0, 1, 0).random() == pytest.approx(0.8710288)
    assert gt_dataset(root, vocab, "train", flip_probability=0.875).draws_flip(0)
    assert not gt_dataset(root, vocab, "train", flip_probability=0.873).draws_flip(0)
    assert gt_dataset(root, vocab, "train", flip_probability=0.873).draws_flip(0, epoch=1)
    np.testing.assert_array_equal(gt_dataset(root, vocab, "train", flip_probability=0.875)[0].text_ids, [CLS, 5, 6, RIGHT, SEP])
    np.testing.assert_array_equal(gt_dataset(root, vocab, "train", flip_probability=0.873)[0].text_ids, [CLS, 5, 6, LEFT, SEP])
    np.testing.assert_array_equal(gt_dataset(root, vocab, "train", flip_probability=0.873).item_in_epoch(0, 1).text_ids, [CLS, 5, 6, RIGHT, SEP])
    data = refcoco_data(root=str(root), vocab=str(vocab), image_transform=HALF, flip_probability=1.0)
    assert data.train.flip_probability == 1.0 and data.val.flip_probability == 0.0
    np.testing.assert_array_equal(data.train[0].boxes[1], [12, 1, 17, 5])
    assert refcoco_data(root=str(root), vocab=str(vocab)).train.flip_probability == 0.5  # TRAIN.FLIP_PROB


def test_ground_truth_boxes_through_refcoco_data(tree):
    root, vocab = tree
    data = refcoco_data(root=str(root), vocab=str(vocab), image_transform=HALF)
    assert len(data.train[0].boxes) == 4 and len(data.val[0].boxes) == 2
    assert "refcoco+" in data.description


def test_collate_pads_region_labels_with_zero(tree):
    root, vocab = tree
    samples = [gt_dataset(root, vocab, "train")[0], gt_dataset(root, vocab, "val")[0]]
    batch = collate_pretraining(samples)
    assert batch.region_labels.shape == (2, 4)
    np.testing.assert_array_equal(batch.region_labels.numpy(), [[0, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch.region_mask.numpy(), [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert batch.images.shape == (2, 3, 10, 20)


def test_missing_image_file_names_record_and_field(tree):
    root, vocab = tree
    (root / "train2014" / IMAGES[1]["file_name"]).unlink()
    with pytest.raises(DataError, match=r"ref_id 1 sent_id 1, field 'file_name': cannot read file .*000002\.jpg"):
        gt_dataset(root, vocab, "val")[0]


def test_image_without_file_name_names_record_and_field(tree):
    root, vocab = tree
    instances = json.loads((root / "refcoco+" / "instances.json").read_text())
    del instances["images"][0]["file_name"]
    (root / "refcoco+" / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(DataError, match=r"ref_id 0 sent_id 0, field 'file_name': image 1 has no file_name"):
        gt_dataset(root, vocab, "train")[0]


def test_undecodable_image_names_record_and_field(tree):
    root, vocab = tree
    (root / "train2014" / IMAGES[0]["file_name"]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"ref_id 0 sent_id 0, field 'file_name': cannot decode"):
        gt_dataset(root, vocab, "train")[0]


def test_exif_orientation_is_not_applied(tree):
    # COCO boxes refer to the stored pixel grid, so a rotation tag must not turn the image.
    root, vocab = tree
    write_jpeg(root / "train2014" / IMAGES[0]["file_name"], orientation=6)
    sample = gt_dataset(root, vocab, "train")[0]
    assert sample.image_size == (20, 10)


def test_configuration_errors_name_the_binding(tree, tmp_path):
    root, vocab = tree
    with pytest.raises(FileNotFoundError, match=r"refcoco_data\.root"):
        refcoco_data(root=str(tmp_path / "absent"), vocab=str(vocab))
    with pytest.raises(ValueError, match=r"refcoco_data\.vocab"):
        refcoco_data(root=str(root))
    with pytest.raises(ValueError, match=r"refcoco_data\.boxes.*'proposals'"):
        refcoco_data(root=str(root), boxes="proposals", vocab=str(vocab))
    with pytest.raises(FileNotFoundError, match=r"refcoco_data\.proposals"):
        refcoco_data(root=str(root), boxes="detected", proposals="missing.json", vocab=str(vocab))
    with pytest.raises(FileNotFoundError, match=r"refcoco_data\.coco_instances"):
        refcoco_data(root=str(root), coco_instances="annotations/instances_train2014.json", vocab=str(vocab))
    with pytest.raises(FileNotFoundError, match=r"refcoco_data\.images"):
        refcoco_data(root=str(root), images="val2014", vocab=str(vocab))
