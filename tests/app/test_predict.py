"""The prediction files of `vlblocks predict`, checked against hand-written file contents in the
layouts the official `{vqa,vcr,refcoco}/function/test.py` write."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlblocks.app.predict import (
    VCR_COLUMNS,
    choice_probabilities,
    csv_number,
    original_boxes,
    refcoco_results,
    vcr_leaderboard_csv,
    vqa_results,
    write_atomically,
)
from vlblocks.data.datasets.refcoco import box_accuracy
from vlblocks.data.datasets.vcr import VCRDataset
from vlblocks.data.errors import DataError
from vlblocks.data.formats.vcr import VCRReader
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer

INF = float("inf")


def test_vqa_results_are_evalai_json_with_the_argmax_answer_string():
    # Classes 2 and 0 of the vocabulary; json.dump's ", " / ": " separators, no newline.
    text = vqa_results([262148000, 262148001], [2, 0], ["yes", "no", "2"])
    assert text == '[{"question_id": 262148000, "answer": "2"}, {"question_id": 262148001, "answer": "yes"}]'


def test_vcr_leaderboard_csv_has_the_official_columns_and_softmax_probabilities():
    answers = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -INF, -INF]])
    # Question 0: every rationale logit 0 (0.25 each). Question 1 given answer a: only rationale a
    # is possible (logit 0, the others -inf), so its probability is 1.
    given = [torch.tensor([[0.0] * 4, [0.0 if r == a else -INF for r in range(4)]]) for a in range(4)]
    rationales = np.concatenate([choice_probabilities(logits) for logits in given], axis=1)
    text = vcr_leaderboard_csv(["test-0", "test-1"], choice_probabilities(answers), rationales)
    expected = (
        "annot_id,answer_0,answer_1,answer_2,answer_3,"
        "rationale_conditioned_on_a0_0,rationale_conditioned_on_a0_1,rationale_conditioned_on_a0_2,rationale_conditioned_on_a0_3,"
        "rationale_conditioned_on_a1_0,rationale_conditioned_on_a1_1,rationale_conditioned_on_a1_2,rationale_conditioned_on_a1_3,"
        "rationale_conditioned_on_a2_0,rationale_conditioned_on_a2_1,rationale_conditioned_on_a2_2,rationale_conditioned_on_a2_3,"
        "rationale_conditioned_on_a3_0,rationale_conditioned_on_a3_1,rationale_conditioned_on_a3_2,rationale_conditioned_on_a3_3\n"
        "test-0,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25\n"
        "test-1,0.5,0.5,0.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0\n"
    )
    assert text == expected
    assert len(VCR_COLUMNS) == 21


def test_csv_numbers_are_the_shortest_float32_digits():
    # float32(1/3) = 0.3333333432674408..., whose shortest float32 digits are 0.33333334; pandas
    # writes those, reads them back as float64 and writes them again unchanged.
    assert csv_number(np.float32(1.0) / np.float32(3.0)) == "0.33333334"
    assert csv_number(np.float32(1e-8)) == "1e-08"


def test_vcr_csv_refuses_probabilities_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\[Q, 16\] rationale"):
        vcr_leaderboard_csv(["a"], np.full((1, 4), 0.25), np.full((1, 4), 0.25))


def test_refcoco_results_list_each_expression_with_its_box():
    boxes = np.asarray([[10, 20, 30.5, 40], [0, 0, 99, 59.25]], np.float32)
    text = refcoco_results([7, 7], boxes)
    assert text == '[{"ref_id": 7, "box": [10.0, 20.0, 30.5, 40.0]}, {"ref_id": 7, "box": [0.0, 0.0, 99.0, 59.25]}]'


def test_boxes_map_back_to_the_original_image_by_float32_division():
    # x / 1.5 and y / 0.5 are exact. float32(1.2) = 1.2000000476837158 and 120 / 1.2000000476837158
    # = 99.9999960..., whose nearest float32 is 99.99999237060547 (float32 spacing near 100 is
    # 2**-17 = 7.63e-6: 99.9999960 is 3.7e-6 above 99.9999924 and 4.0e-6 below 100).
    resized = np.asarray([[60, 30, 120, 90], [120, 0, 120, 0]], np.float32)
    mapped = original_boxes(resized, np.asarray([[1.5, 0.5], [1.2, 1.2]]))
    assert mapped.dtype == np.float32
    assert mapped.tolist() == [[40.0, 60.0, 80.0, 180.0], [99.99999237060547, 0.0, 99.99999237060547, 0.0]]


def test_box_accuracy_counts_iou_of_at_least_a_half_with_inclusive_pixels():
    predicted = np.asarray([[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9]], np.float32)
    # Same box: IoU 1. Shifted by 5: inter 5 x 10 = 50, union 100 + 100 - 50 = 150, IoU 1/3.
    # Twice as wide: inter 100, union 100 + 200 - 100 = 200, IoU exactly 0.5: counts (>=).
    targets = np.asarray([[0, 0, 9, 9], [5, 0, 14, 9], [0, 0, 19, 9]], np.float32)
    assert box_accuracy(predicted, targets) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many predicted boxes"):
        box_accuracy(predicted, targets[:2])


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "deep" / "results.json"
    write_atomically("[]", out)
    assert out.read_text() == "[]" and [p.name for p in out.parent.iterdir()] == ["results.json"]

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("vlblocks.app.files.os.replace", fail)
    with pytest.raises(OSError):
        write_atomically("[1]", tmp_path / "other.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "casey", "doing", "?", ".", "eating", "sleeping", "because", "yes", "no"]


@pytest.fixture
def vcr_test_split(tmp_path):
    """A VCR folder with one unlabelled test question about one 40 x 30 image."""
    (tmp_path / "vcr1images" / "m").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "vcr1images" / "m" / "a.jpg")
    metadata = {"boxes": [[1, 2, 20, 25, 0.9]], "segms": [[]], "names": ["person"], "width": 40, "height": 30}
    (tmp_path / "vcr1images" / "m" / "a.json").write_text(json.dumps(metadata))
    line = {
        "annot_id": "test-0", "movie": "m", "objects": ["person"], "img_fn": "m/a.jpg", "metadata_fn": "m/a.json",
        "question": ["What", "is", [0], "doing", "?"],
        "answer_choices": [["Eating", "."], ["Sleeping", "."], [[0], "is", "eating"], ["No"]],
        "rationale_choices": [["Because", "."], ["Yes"], ["No"], ["Because", [0]]],
    }
    (tmp_path / "test.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token in VOCAB))
    reader = VCRReader(tmp_path / "test.jsonl", tmp_path / "vcr1images")
    return VCRDataset(reader, WordPieceTokenizer(tmp_path / "vocab.txt"), ImageTransform(30, 100), "qa2r", max_text_pieces=4)


def test_qa2r_conditioned_on_an_answer_reads_the_unlabelled_test_split_untruncated(vcr_test_split):
    with pytest.raises(DataError, match="answer_label"):
        vcr_test_split[0]
    rows = vcr_test_split.conditioned_on(2)[0]
    ids = {token: index for index, token in enumerate(VOCAB)}
    # Question "what is casey doing ?" (casey: the first person) + answer 2 "casey is eating",
    # all 8 pieces kept although max_text_pieces is 4 (the official test mode never truncates QA->R).
    question = [ids[w] for w in "what is casey doing ? casey is eating".split()]
    assert rows[3].text_ids.tolist() == [ids["[CLS]"], *question, ids["[SEP]"], ids["because"], ids["casey"], ids["[SEP]"]]
    assert [row.choice_label for row in rows] == [None] * 4
    with pytest.raises(ValueError, match="answer in 0-3"):
        vcr_test_split.conditioned_on(4)
