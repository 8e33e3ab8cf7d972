"""VQADataset / vqa_data: VL-BERT's VQA input over VQA v2 files and VL-BERT feature json."""

import base64
import json

import numpy as np
import pytest

from vlblocks.data.datasets.vqa import FeatureDirectory, VQADataset, feature_source, vqa_data
from vlblocks.data.demo.scenes import DemoScenes
from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import read_feature_json
from vlblocks.data.formats.feature_store import FeatureStore, pack_features
from vlblocks.data.formats.vqa import VQAReader
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "cat", "?", "##s",
         "left", "right", "on", "or", "##most"]
CLS, SEP, MASK = 2, 3, 4
LEFT, RIGHT, ON, OR, MOST = 12, 13, 14, 15, 16


def b64(array):
    return base64.b64encode(np.asarray(array, np.float32).tobytes()).decode()


@pytest.fixture
def root(tmp_path):
    """A VL-BERT `data/coco` tree: one val2014 question and one test2015 question."""
    root = tmp_path / "coco"
    (root / "vqa").mkdir(parents=True)
    features = root / "features"
    features.mkdir()
    questions = {"info": {}, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "questions": [{"image_id": 42, "question": "What color is the cats?", "question_id": 420}]}
    annotations = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": [{
        "question_id": 420, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
        "multiple_choice_answer": "black",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["black"] * 7 + ["white"] * 2 + ["grey"])],
    }]}
    (root / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (root / "vqa" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    test = dict(questions, data_subtype="test2015", questions=[{"image_id": 7, "question": "What?", "question_id": 70}])
    (root / "vqa" / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(test))
    (root / "vqa" / "answers_vqa.txt").write_text("white\nblack\nyes\n")
    boxes = [[1, 2, 10, 12], [5, 5, 30, 20]]
    feats = [[1, 2, 3], [3, 4, 5]]
    (features / "42.json").write_text(json.dumps({"image_id": 42, "image_w": 40, "image_h": 30, "num_boxes": 2,
                                                  "boxes": b64(boxes), "features": b64(feats)}))
    (features / "7.json").write_text(json.dumps({"image_id": 7, "image_w": 40, "image_h": 30, "num_boxes": 2,
                                                 "boxes": b64(boxes), "features": b64(feats), "image_box_feature": b64([9, 9, 9])}))
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


def dataset(root, split="val2014"):
    annotations = root / "vqa" / f"v2_mscoco_{split}_annotations.json"
    reader = VQAReader(root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json", annotations if annotations.exists() else None)
    tokenizer = WordPieceTokenizer(root.parent / "vocab.txt")
    return VQADataset(reader, FeatureDirectory(root / "features"), tokenizer, ["white", "black", "yes"])


def test_text_is_cls_question_sep_mask_sep_with_the_answer_in_segment_b(root):
    sample = dataset(root)[0]
    # what color is the cat ##s ?
    assert sample.text_ids.tolist() == [CLS, 5, 6, 7, 8, 9, 11, 10, SEP, MASK, SEP]
    assert sample.segment_ids.tolist() == [0] * 9 + [1, 1]
    assert sample.answer_position == 9 and sample.text_ids[sample.answer_position] == MASK
    assert sample.word_index.tolist() == [-1, 0, 1, 2, 3, 4, 4, 5, -1, -1, -1]
    assert sample.token_regions is None  # every token sees the whole image


def test_regions_are_the_whole_image_then_the_file_boxes_with_the_mean_feature_first(root):
    sample = dataset(root)[0]
    assert sample.image_size == (40, 30)
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 39, 29], [1, 2, 10, 12], [5, 5, 30, 20]])
    np.testing.assert_allclose(sample.features, [[2, 3, 4], [1, 2, 3], [3, 4, 5]])


def test_image_box_feature_is_the_whole_image_feature_when_given(root):
    np.testing.assert_allclose(dataset(root, "test2015")[0].features[0], [9, 9, 9])


def test_answer_scores_are_the_soft_scores_over_the_vocabulary(root):
    scores = dataset(root)[0].answer_scores
    # black: 7 humans -> 1; white: 2 humans -> leave-one-out mean of min(1, n/3) = 0.6; grey not in vocabulary
    np.testing.assert_allclose(scores, [0.6, 1.0, 0.0], atol=1e-6)


def test_test_split_has_no_scores_and_collates(root):
    sample = dataset(root, "test2015")[0]
    assert sample.answer_scores is None
    batch = collate_pretraining([sample, sample])
    assert batch.answer_scores is None and batch.answer_positions.tolist() == [4, 4]


def test_collate_pads_and_stacks_the_task_fields(root):
    long, short = dataset(root)[0], dataset(root, "test2015")[0]
    short.answer_scores = np.zeros(3, np.float32)
    batch = collate_pretraining([long, short])
    assert batch.answer_positions.tolist() == [9, 4]
    assert batch.segment_ids.tolist()[1] == [0, 0, 0, 0, 1, 1] + [0] * 5
    assert batch.answer_scores.shape == (2, 3) and batch.region_features.shape == (2, 3, 3)


def test_a_packed_store_serves_the_same_features(root, tmp_path):
    store_dir = pack_features((read_feature_json(p) for p in [root / "features" / "42.json"]), tmp_path / "store")
    source = feature_source(store_dir)
    assert isinstance(feature_source(root / "features"), FeatureDirectory)
    np.testing.assert_allclose(source(42).features, read_feature_json(root / "features" / "42.json").features)
    assert len(FeatureStore(store_dir)) == 1


def test_vqa_data_reads_the_official_layout(root):
    data = vqa_data(str(root), train_splits=["val2014"], val_split="test2015", features="features", vocab=str(root.parent / "vocab.txt"))
    assert data.answers == ["white", "black", "yes"] and not data.is_demo
    assert len(data.train) == 1 and data.val[0].answer_scores is None


def test_vqa_data_names_the_binding_of_what_is_missing(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="vqa_data.root"):
        vqa_data(str(tmp_path / "nowhere"), vocab=str(root.parent / "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="vqa_data.features"):
        vqa_data(str(root), vocab=str(root.parent / "vocab.txt"))
    with pytest.raises(ValueError, match="vqa_data.vocab"):
        vqa_data(str(root))


def test_vqa_data_without_a_root_uses_the_demo_in_the_same_layout(demo_tasks):
    paths = demo_tasks["vqa"]
    data = vqa_data(None, demo=DemoScenes(str(paths.root.parent.parent), train=96, val=32))
    assert data.is_demo and "no data configured" in data.description and "vqa_data.root" in data.description
    sample = data.train[0]
    assert sample.features.shape[1] == 48 and sample.answer_scores.max() == 1.0


# ---------------------------------------------------------------- horizontal flip (VL-BERT vqa.py)

FLIP_ANSWERS = ["left", "right", "left side", "right side"]


@pytest.fixture
def flip_root(root):
    """A train2014 split: one left/right question over image 42 (40 x 30), answers mixing the two."""
    questions = {"questions": [{"image_id": 42, "question": "Is the cat on the leftmost or right?", "question_id": 421}]}
    answers = ["left"] * 4 + ["right"] * 2 + ["Left", "left side", "right side", "leftmost"]
    annotations = {"annotations": [{
        "question_id": 421, "image_id": 42, "question_type": "is the", "answer_type": "other", "multiple_choice_answer": "left",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }]}
    (root / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (root / "vqa" / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    return root


def flip_dataset(root, flip_probability, **options):
    reader = VQAReader(root / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json", root / "vqa" / "v2_mscoco_train2014_annotations.json")
    tokenizer = WordPieceTokenizer(root.parent / "vocab.txt")
    return VQADataset(reader, FeatureDirectory(root / "features"), tokenizer, FLIP_ANSWERS, flip_probability=flip_probability, **options)


def test_unflipped_sample_keeps_text_boxes_and_answers(flip_root):
    sample = flip_dataset(flip_root, 0.0)[0]
    # is the cat on the left ##most or right ?
    assert sample.text_ids.tolist() == [CLS, 7, 8, 9, ON, 8, LEFT, MOST, OR, RIGHT, 10, SEP, MASK, SEP]
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 39, 29], [1, 2, 10, 12], [5, 5, 30, 20]])
    # left: 4 of 10 -> 1.0; right: 2 -> 0.6; left side, right side: 1 each -> 0.3 ("Left", "leftmost" are no class)
    np.testing.assert_allclose(sample.answer_scores, [1.0, 0.6, 0.3, 0.3], atol=1e-6)


def test_flipped_sample_swaps_left_and_right_pieces_mirrors_boxes_and_swaps_answers(flip_root):
    sample = flip_dataset(flip_root, 1.0)[0]
    # the pieces "left" and "right" swap, "##most" stays (VL-BERT flips WordPiece tokens): rightmost ... left
    assert sample.text_ids.tolist() == [CLS, 7, 8, 9, ON, 8, RIGHT, MOST, OR, LEFT, 10, SEP, MASK, SEP]
    # x -> 40 - 1 - x, x1 and x2 swapping roles: [1, 2, 10, 12] -> [29, 2, 38, 12]; [5, 5, 30, 20] -> [9, 5, 34, 20]
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 39, 29], [29, 2, 38, 12], [9, 5, 34, 20]])
    # answers flipped word by word, case-sensitively: 4 x right, 2 x left, "Left", "right side", "left side", "leftmost"
    # -> left 0.6, right 1.0, left side 0.3, right side 0.3
    np.testing.assert_allclose(sample.answer_scores, [0.6, 1.0, 0.3, 0.3], atol=1e-6)
    np.testing.assert_allclose(sample.features, flip_dataset(flip_root, 0.0)[0].features)  # features are not flipped


def test_flip_draw_comes_from_the_seed_the_epoch_and_the_sample_index(flip_root):
    data = flip_dataset(flip_root, 0.5, seed=3, index_offset=5)
    for epoch in range(3):
        for index in range(20):
            assert data.flipped(index, epoch) == (sample_random(3, epoch, 5 + index).random() < 0.5)
    assert [data.flipped(i, 0) for i in range(20)] != [data.flipped(i, 1) for i in range(20)]
    assert data.item_in_epoch(0, 1).text_ids.tolist() == flip_dataset(flip_root, 1.0 if data.flipped(0, 1) else 0.0)[0].text_ids.tolist()
    flips = [flip_dataset(flip_root, 0.5, seed=seed).flipped(0) for seed in range(40)]
    assert 0 < sum(flips) < 40
    with pytest.raises(ValueError, match="flip_probability"):
        flip_dataset(flip_root, 1.5)


def test_boxes_are_clamped_to_the_image(flip_root):
    features = flip_root / "features" / "42.json"
    record = json.loads(features.read_text())
    record["boxes"] = b64([[-0.5, 2, 10, 12], [5, -0.5, 39.75, 29.5]])  # the reader allows up to 1 px outside
    features.write_text(json.dumps(record))
    # VL-BERT clamps x to [0, 39] and y to [0, 29] after the (possible) flip
    np.testing.assert_array_equal(flip_dataset(flip_root, 0.0)[0].boxes, [[0, 0, 39, 29], [0, 2, 10, 12], [5, 0, 39, 29]])
    # flipped: [-0.5, 2, 10, 12] -> [29, 2, 39.5, 12] -> [29, 2, 39, 12]; [5, -0.5, 39.75, 29.5] -> [-0.75, -0.5, 34, 29.5] -> [0, 0, 34, 29]
    np.testing.assert_array_equal(flip_dataset(flip_root, 1.0)[0].boxes, [[0, 0, 39, 29], [29, 2, 39, 12], [0, 0, 34, 29]])


def test_normalize_answers_option_matches_bottom_up_attention_targets(flip_root):
    # flipped first (4 x right, 2 x left, "Left" kept), then normalised: "Left" -> "left" makes 3 x left -> 0.9
    sample = flip_dataset(flip_root, 1.0, normalize_answers=True)[0]
    np.testing.assert_allclose(sample.answer_scores, [0.9, 1.0, 0.3, 0.3], atol=1e-6)


def test_vqa_data_flips_only_training_samples_and_offsets_concatenated_splits(flip_root):
    data = vqa_data(str(flip_root), train_splits=["val2014", "train2014"], val_split="val2014", features="features",
                    vocab=str(flip_root.parent / "vocab.txt"), seed=7)
    first, second = data.train.datasets
    assert (first.flip_probability, second.flip_probability, data.val.flip_probability) == (0.5, 0.5, 0.0)
    assert (first.index_offset, second.index_offset, first.seed) == (0, 1, 7)


def test_vqa_data_matches_answers_against_the_processed_vocabulary(flip_root):
    (flip_root / "vqa" / "answers_vqa.txt").write_text("<unk>\nWhite\nblack.\nyes\n")
    data = vqa_data(str(flip_root), train_splits=["val2014"], val_split="val2014", features="features",
                    vocab=str(flip_root.parent / "vocab.txt"))
    # VL-BERT reads lines lower-cased and through processPunctuation: "White" -> "white", "black." -> "black"
    assert data.answers == ["<unk>", "white", "black", "yes"]
    np.testing.assert_allclose(data.val[0].answer_scores, [0.0, 0.6, 1.0, 0.0], atol=1e-6)
    (flip_root / "vqa" / "answers_vqa.txt").write_text("black\nBlack\n")
    with pytest.raises(DataError, match="answers_vqa.txt"):
        vqa_data(str(flip_root), train_splits=["val2014"], val_split="val2014", features="features",
                 vocab=str(flip_root.parent / "vocab.txt"))
