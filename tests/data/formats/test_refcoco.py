import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlblocks.data.errors import DataError
from vlblocks.data.formats.refcoco import RefCocoReader, iou_plus_one, refcoco_labels
from vlblocks.data.formats.safe_pickle import convert_refs_to_json, safe_load_pickle

FUZZ = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -1, 0, 10, 11, "train", "testA"])
    | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)

PICKLE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([-(2**70), 10**400, 10, "testB"])
    | st.builds(pow, st.just(2), st.just(20000))  # an int too long to print
    | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4),
    max_leaves=16,
)

REFS = [
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000001_10.jpg", "ann_id": 10, "ref_id": 0,
     "image_id": 1, "split": "train", "category_id": 1,
     "sentences": [
         {"tokens": ["man", "on", "left"], "raw": "Man on LEFT", "sent_id": 0, "sent": "man on left"},
         {"tokens": ["guy", "in", "red"], "raw": "guy in red", "sent_id": 1, "sent": "guy in red"},
     ]},
    {"sent_ids": [7], "file_name": "COCO_train2014_000000000002_20.jpg", "ann_id": 20, "ref_id": 3,
     "image_id": 2, "split": "testA", "category_id": 18,
     "sentences": [{"tokens": ["dog"], "raw": "dog", "sent_id": 7, "sent": "dog"}]},
]
INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 640, "height": 480}],
    "annotations": [
        {"id": 10, "image_id": 1, "bbox": [10, 10, 20, 30], "category_id": 1, "segmentation": [[]], "area": 600,
         "iscrowd": 0},
        {"id": 11, "image_id": 1, "bbox": [0.5, 0, 5, 5.25], "category_id": 3, "segmentation": [[]], "area": 25,
         "iscrowd": 0},
        {"id": 20, "image_id": 2, "bbox": [100, 50, 40, 60], "category_id": 18, "segmentation": [[]], "area": 1,
         "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
}
PROPOSALS = [
    {"image_id": 1, "box": [11, 11, 20, 30], "category_id": 1, "score": 0.9, "det_id": 500},
    {"image_id": 2, "box": [0, 0, 10, 10], "category_id": 18, "score": 0.8, "det_id": 501},
    {"image_id": 1, "box": [200, 200, 10, 10], "category_id": 3, "score": 0.7, "det_id": 502},
]


def write_refs(path: Path, refs, protocol: int = 2) -> Path:
    with open(path, "wb") as handle:
        pickle.dump(refs, handle, protocol=protocol)
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.fixture
def refcoco(tmp_path):
    return write_refs(tmp_path / "refs(unc).p", REFS), write_json(tmp_path / "instances.json", INSTANCES)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reads_one_expression_per_sentence_with_ground_truth_candidates(refcoco):
    refs, instances = refcoco
    reader = RefCocoReader(refs, instances)
    assert len(reader) == 3
    first = reader[0]
    assert (first.ref_id, first.sent_id, first.image_id, first.split) == (0, 0, 1, "train")
    assert first.tokens == ["man", "on", "left"] and first.sentence == "man on left"
    assert first.category_id == 1 and first.ann_id == 10
    assert first.record == f"{refs} ref_id 0 sent_id 0"
    np.testing.assert_array_equal(first.target_box, [10, 10, 30, 40])
    assert first.target_box.dtype == np.float32
    np.testing.assert_array_equal(first.candidate_boxes, [[10, 10, 30, 40], [0.5, 0, 5.5, 5.25]])
    assert first.candidate_ids == [10, 11]
    assert first.image_file_name == "COCO_train2014_000000000001.jpg"
    np.testing.assert_array_equal(refcoco_labels(first.candidate_boxes, first.target_box), [True, False])
    assert reader[1].sentence == "guy in red" and reader[1].sent_id == 1
    last = reader[-1]
    assert (last.ref_id, last.sent_id, last.split) == (3, 7, "testA")
    np.testing.assert_array_equal(last.candidate_boxes, [[100, 50, 140, 110]])
    assert [e.sent_id for e in reader] == [0, 1, 7]


def test_split_filter_and_unknown_split_argument(refcoco):
    refs, instances = refcoco
    assert [e.ref_id for e in RefCocoReader(refs, instances, split="testA")] == [3]
    assert len(RefCocoReader(refs, instances, split="val")) == 0
    with pytest.raises(ValueError):
        RefCocoReader(refs, instances, split="testC")


def test_proposals_replace_ground_truth_candidates(refcoco, tmp_path):
    refs, instances = refcoco
    proposals = write_json(tmp_path / "dets.json", PROPOSALS)
    first = RefCocoReader(refs, instances, proposals_file=proposals)[0]
    np.testing.assert_array_equal(first.candidate_boxes, [[11, 11, 31, 41], [200, 200, 210, 210]])
    assert first.candidate_ids == [500, 502]
    np.testing.assert_array_equal(first.target_box, [10, 10, 30, 40])
    np.testing.assert_array_equal(refcoco_labels(first.candidate_boxes, first.target_box), [True, False])


def test_proposal_reader_still_lists_the_images_ground_truth_boxes(refcoco, tmp_path):
    # VL-BERT trains on "proposal+gt": it needs every annotation of the image besides the proposals.
    refs, instances = refcoco
    proposals = write_json(tmp_path / "dets.json", PROPOSALS)
    first = RefCocoReader(refs, instances, proposals_file=proposals)[0]
    # Annotations 10 [10, 10, 20, 30] and 11 [0.5, 0, 5, 5.25] as x1, y1, x + w, y + h.
    np.testing.assert_array_equal(first.annotation_boxes, [[10, 10, 30, 40], [0.5, 0, 5.5, 5.25]])
    assert first.annotation_ids == [10, 11]
    assert first.annotation_boxes.dtype == np.float32


def test_ground_truth_boxes_from_a_second_coco_instances_file(refcoco, tmp_path):
    # VL-BERT reads the image's boxes from COCO's instances_train2014.json, in that file's order
    # (pycocotools' imgToAnns), and the referred box from REFER's instances.json.
    refs, instances = refcoco
    coco = copy.deepcopy(INSTANCES)
    extra = {"id": 12, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 3, "segmentation": [[]], "area": 12, "iscrowd": 0}
    coco["annotations"] = [coco["annotations"][1], extra, coco["annotations"][2], coco["annotations"][0]]
    coco_file = write_json(tmp_path / "instances_train2014.json", coco)
    first = RefCocoReader(refs, instances, annotations_file=coco_file)[0]
    np.testing.assert_array_equal(first.annotation_boxes, [[0.5, 0, 5.5, 5.25], [1, 2, 4, 6], [10, 10, 30, 40]])
    assert first.annotation_ids == [11, 12, 10]
    assert first.candidate_ids == [11, 12, 10]
    np.testing.assert_array_equal(first.target_box, [10, 10, 30, 40])


def test_malformed_ground_truth_box_in_the_coco_file_names_it(refcoco, tmp_path):
    refs, instances = refcoco
    coco = copy.deepcopy(INSTANCES)
    coco["annotations"][1]["bbox"] = [1, 2, 3]
    coco_file = write_json(tmp_path / "instances_train2014.json", coco)
    with pytest.raises(DataError, match=r"ref_id 0 sent_id 0, field 'bbox': .*instances_train2014\.json annotation 11"):
        RefCocoReader(refs, instances, annotations_file=coco_file)[0]


def test_image_without_proposals_has_no_candidates(refcoco, tmp_path):
    refs, instances = refcoco
    proposals = write_json(tmp_path / "dets.json", PROPOSALS[:1])
    assert RefCocoReader(refs, instances, proposals_file=proposals)[2].candidate_boxes.shape == (0, 4)


def test_iou_plus_one_by_hand():
    a = [0, 0, 9, 9]  # 10 x 10 pixels with inclusive ends
    assert iou_plus_one(a, a) == pytest.approx(1.0)
    assert iou_plus_one(a, [5, 5, 14, 14]) == pytest.approx(25 / 175)
    assert iou_plus_one(a, [9, 0, 18, 9]) == pytest.approx(10 / 190)  # one shared pixel column
    assert iou_plus_one(a, [10, 0, 19, 9]) == 0.0
    assert iou_plus_one([5, 5, 5, 5], [5, 5, 5, 5]) == pytest.approx(1.0)  # a 1-pixel box
    assert iou_plus_one([0, 0, 4, 9], a) == pytest.approx(50 / 100)
    np.testing.assert_allclose(iou_plus_one([[0, 0, 9, 9], [5, 5, 14, 14]], a), [1, 25 / 175])


def test_labels_need_iou_strictly_above_half():
    target = [0, 0, 9, 9]
    candidates = [[0, 0, 4, 9], [0, 0, 5, 9], [20, 20, 30, 30], [0, 0, 9, 9]]  # IoU 0.5, 0.6, 0, 1
    np.testing.assert_array_equal(refcoco_labels(candidates, target), [False, True, False, True])
    assert refcoco_labels(np.zeros((0, 4)), target).shape == (0,)


def test_json_conversion_round_trip_reads_the_same(refcoco, tmp_path):
    refs, instances = refcoco
    converted = convert_refs_to_json(refs, tmp_path / "out" / "refs(unc).json")
    assert json.loads(converted.read_text()) == REFS
    assert [p.name for p in converted.parent.iterdir()] == ["refs(unc).json"]  # no temp file left
    from_pickle, from_json = list(RefCocoReader(refs, instances)), list(RefCocoReader(converted, instances))
    assert len(from_json) == len(from_pickle) == 3
    for a, b in zip(from_pickle, from_json):
        assert (a.ref_id, a.sent_id, a.tokens, a.sentence, a.split) == (b.ref_id, b.sent_id, b.tokens, b.sentence, b.split)
        np.testing.assert_array_equal(a.candidate_boxes, b.candidate_boxes)


def test_conversion_refuses_data_json_cannot_hold(tmp_path):
    path = write_refs(tmp_path / "refs.p", [{"ids": {1, 2}}], protocol=4)  # sets need protocol 4
    with pytest.raises(DataError, match="cannot be written as JSON"):
        convert_refs_to_json(path, tmp_path / "refs.json")
    assert not (tmp_path / "refs.json").exists()
    with pytest.raises(DataError, match="expected a list"):
        convert_refs_to_json(write_refs(tmp_path / "d.p", {"a": 1}), tmp_path / "refs.json")


def test_python2_byte_strings_are_decoded(tmp_path):
    # Protocol 2 as Python 2 writes it: SHORT_BINSTRING ('U') for 8-bit str values.
    utf8 = b"\x80\x02}q\x00(U\x03rawq\x01U\x05caf\xc3\xa9q\x02U\x01kq\x03X\x02\x00\x00\x00\xc3\xa9q\x04u."
    (tmp_path / "a.p").write_bytes(utf8)
    assert safe_load_pickle(tmp_path / "a.p") == {"raw": "café", "k": "é"}
    (tmp_path / "b.p").write_bytes(b"\x80\x02U\x04caf\xe9q\x00.")  # not UTF-8: Latin-1 fallback
    assert safe_load_pickle(tmp_path / "b.p") == "café"
    assert safe_load_pickle(tmp_path / "b.p", decode_bytes=False) == b"caf\xe9"


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([Evil(marker)], protocol=2))
    with pytest.raises(DataError) as error:
        safe_load_pickle(path)
    assert str(path) in str(error.value) and "system" in str(error.value)
    assert not marker.exists()
    with pytest.raises(DataError, match="system"):
        RefCocoReader(path, tmp_path / "instances.json")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_global_is_refused(tmp_path, protocol):
    path = tmp_path / "g.p"
    path.write_bytes(pickle.dumps([np.float64(1.0)], protocol=protocol))
    with pytest.raises(DataError, match="refers to the global"):
        safe_load_pickle(path)


def test_self_referencing_and_shared_structures(tmp_path):
    loop: list = []
    loop.append(loop)
    path = write_refs(tmp_path / "loop.p", loop)
    with pytest.raises(DataError, match="contains itself"):
        safe_load_pickle(path)
    shared: list = [b"x"]  # Python 3 bytes need protocol 3 or later
    for _ in range(60):  # 2**60 paths through the structure: must be decoded once per node
        shared = [shared, shared]
    loaded = safe_load_pickle(write_refs(tmp_path / "dag.p", shared, protocol=4))
    for _ in range(60):
        assert loaded[0] is loaded[1]
        loaded = loaded[0]
    assert loaded == ["x"]


def test_huge_memo_index_needs_no_huge_memory(tmp_path):
    # LONG_BINPUT 0x7fffffff: the C unpickler would grow its memo table to 2**32 entries.
    (tmp_path / "memo.p").write_bytes(b"\x80\x02]r\xff\xff\xff\x7f.")
    assert safe_load_pickle(tmp_path / "memo.p") == []


@pytest.mark.parametrize("content", [b"", b"\x80\x02", b"not a pickle", b"\x80\x02]q\x00(K\x01"])
def test_truncated_or_garbage_pickle_is_data_error(tmp_path, content):
    (tmp_path / "x.p").write_bytes(content)
    with pytest.raises(DataError, match="cannot be loaded"):
        safe_load_pickle(tmp_path / "x.p")


def mutated_refs(index: int, **changes) -> list:
    refs = copy.deepcopy(REFS)
    refs[index].update(changes)
    return refs


@pytest.mark.parametrize(
    "refs, index, where, field",
    [
        (mutated_refs(0, ann_id=99), 0, "ref_id 0 sent_id 0", "'ann_id'"),
        (mutated_refs(1, split="bogus"), 2, "ref_id 3 sent_id 7", "'split'"),
        (mutated_refs(1, sentences=[{"tokens": [], "sent_id": 7, "sent": ""}]), 2, "ref_id 3 sent_id 7", "'tokens'"),
        (mutated_refs(1, sentences=[{"tokens": ["a", 3], "sent_id": 7, "sent": "a"}]), 2, "ref_id 3 sent_id 7",
         "'tokens'"),
        (mutated_refs(1, sentences=[]), 2, "ref_id 3", "'sentences'"),
        (mutated_refs(1, image_id=1), 2, "ref_id 3 sent_id 7", "'image_id'"),
        (mutated_refs(1, category_id="dog"), 2, "ref_id 3 sent_id 7", "'category_id'"),
        (mutated_refs(1, ref_id=None), 2, "ref #1 sent_id 7", "'ref_id'"),
        (mutated_refs(0, ref_id=2**20000), 0, "ref #0 sent_id 0", "'ref_id'"),  # too long to print
    ],
)
def test_malformed_ref_names_file_ref_sentence_and_field(tmp_path, refs, index, where, field):
    path = write_refs(tmp_path / "refs(unc).p", refs)
    instances = write_json(tmp_path / "instances.json", INSTANCES)
    with pytest.raises(DataError) as error:
        RefCocoReader(path, instances)[index]
    assert f"{path} {where}, field {field}" in str(error.value)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, -3, 4], [1, 2, "3", 4], None, [1, 2, float("nan"), 4]])
def test_malformed_bbox_is_reported_with_the_annotation(tmp_path, bbox):
    instances = copy.deepcopy(INSTANCES)
    instances["annotations"][0]["bbox"] = bbox
    refs = write_refs(tmp_path / "refs.p", REFS)
    reader = RefCocoReader(refs, write_json(tmp_path / "instances.json", instances))
    with pytest.raises(DataError) as error:
        reader[0]
    message = str(error.value)
    assert f"{refs} ref_id 0 sent_id 0, field 'bbox'" in message and "instances.json annotation 10" in message
    assert reader[2].ref_id == 3  # other images are unaffected


def test_malformed_proposal_box_is_reported(refcoco, tmp_path):
    refs, instances = refcoco
    proposals = copy.deepcopy(PROPOSALS)
    proposals[2]["box"] = [1, 2]
    reader = RefCocoReader(refs, instances, proposals_file=write_json(tmp_path / "dets.json", proposals))
    with pytest.raises(DataError, match=r"ref_id 0 sent_id 0, field 'box': .*dets\.json det_id 502"):
        reader[0]


@pytest.mark.parametrize(
    "instances, pattern",
    [
        ([1], "field 'annotations'"),
        ({"annotations": [{"id": 1}]}, r"annotations\[0\], field 'image_id'"),
        ({"annotations": [{"id": 1, "image_id": 1}, {"id": 1, "image_id": 2}]}, "duplicate id 1"),
    ],
)
def test_malformed_instances_file_raises_when_opened(refcoco, tmp_path, instances, pattern):
    refs, _ = refcoco
    with pytest.raises(DataError, match=pattern):
        RefCocoReader(refs, write_json(tmp_path / "bad.json", instances))


def test_skip_mode_skips_bad_sentences(tmp_path):
    refs = mutated_refs(0, ann_id=99)
    path = write_refs(tmp_path / "refs.p", refs)
    reader = RefCocoReader(path, write_json(tmp_path / "i.json", INSTANCES), skip_bad_records=True)
    assert [e.sent_id for e in reader] == [7]
    assert len(reader.skipped) == 2 and "ref_id 0 sent_id 1, field 'ann_id'" in reader.skipped[1]
    with pytest.raises(DataError):
        list(RefCocoReader(path, tmp_path / "i.json"))


@FUZZ
@given(
    raw=st.binary(max_size=120),
    mode=st.sampled_from(["raw", "header", "mutated"]),
    position=st.integers(min_value=0, max_value=400),
    protocol=st.integers(min_value=0, max_value=5),
)
def test_fuzz_arbitrary_pickle_bytes_only_data_error_or_success(tmp_path, raw, mode, position, protocol):
    if mode == "header":
        raw = b"\x80\x02" + raw
    elif mode == "mutated":  # a valid refs pickle with a stretch of bytes overwritten
        valid = pickle.dumps(REFS, protocol=protocol)
        position %= len(valid)
        raw = valid[:position] + raw + valid[position + len(raw):]
    (tmp_path / "fuzz.p").write_bytes(raw)
    try:
        safe_load_pickle(tmp_path / "fuzz.p")
    except DataError:
        pass


@FUZZ
@given(
    key=st.sampled_from(["ann_id", "ref_id", "image_id", "split", "sentences", "category_id", "sent_ids"]),
    value=PICKLE_VALUES,
    sentence_key=st.sampled_from(["tokens", "sent_id", "sent", None]),
    sentence_value=PICKLE_VALUES,
    extra=PICKLE_VALUES,
)
def test_fuzz_refs_only_data_error_or_success(tmp_path, key, value, sentence_key, sentence_value, extra):
    refs = copy.deepcopy(REFS) + [extra]
    refs[0][key] = value
    if sentence_key is not None:
        refs[1]["sentences"][0][sentence_key] = sentence_value
    path = write_refs(tmp_path / "fuzz.p", refs)
    instances = write_json(tmp_path / "instances.json", INSTANCES)
    reader = RefCocoReader(path, instances, split="train", skip_bad_records=True)
    items = list(reader)
    assert len(items) + len(reader.skipped) == len(reader)


@FUZZ
@given(
    annotation_key=st.sampled_from(["id", "image_id", "bbox"]),
    value=JSON_VALUES,
    proposals=JSON_VALUES,
    instances_raw=st.binary(max_size=60),
    use_raw=st.booleans(),
)
def test_fuzz_instances_and_proposals_only_data_error_or_success(
    refcoco, tmp_path, annotation_key, value, proposals, instances_raw, use_raw
):
    refs, _ = refcoco
    instances = copy.deepcopy(INSTANCES)
    instances["annotations"][1][annotation_key] = value
    instances_path = tmp_path / "fuzz_instances.json"
    if use_raw:
        instances_path.write_bytes(instances_raw)
    else:
        write_json(instances_path, instances)
    for proposals_file in (None, write_json(tmp_path / "fuzz_dets.json", [proposals] + PROPOSALS)):
        try:
            reader = RefCocoReader(refs, instances_path, proposals_file=proposals_file, skip_bad_records=True)
            list(reader)
        except DataError:
            pass
