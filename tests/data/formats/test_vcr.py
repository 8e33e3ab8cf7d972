import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlblocks.data.errors import DataError
from vlblocks.data.formats.vcr import (
    GENDER_NEUTRAL_NAMES,
    VCRMetadata,
    VCRReader,
    ground_tokens,
    instance_masks,
    parse_vcr_metadata,
    polygon_masks,
    read_vcr_metadata,
)

FUZZ = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -1, 0, 1, 3, 4, [0], [9], [[0, 1]]])
    | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)

OBJECTS = ["person", "person", "car", "person", "dining table"]
METADATA = {
    "boxes": [[10, 20, 24, 34, 0.99], [0, 0, 50, 40, 0.9], [30, 10, 60, 30, 0.8], [1, 1, 5, 5, 0.7],
              [40, 40, 79, 59, 0.6]],
    "segms": [
        [[[10, 20], [17, 20], [17, 34], [10, 34]]],
        [[[0, 0], [50, 0], [50, 40], [0, 40]]],
        [[[30, 10], [60, 10], [60, 30]], [[30, 10], [31, 10], [30, 30]]],
        [],
        [[[40, 40], [79, 40], [79, 59], [40, 59]]],
    ],
    "names": OBJECTS,
    "width": 80,
    "height": 60,
}


def record(annot_id="val-0", **overrides) -> dict:
    result = {
        "movie": "1054_Harry_Potter", "objects": list(OBJECTS), "interesting_scores": [0],
        "answer_likelihood": "likely", "img_fn": "lsmdc_1054/a.jpg", "metadata_fn": "lsmdc_1054/a.json",
        "answer_orig": "x", "question_orig": "x", "rationale_orig": "x",
        "question": ["What", "is", [0, 1], "doing", "near", [2], "?"],
        "answer_match_iter": [0, 1, 2, 3], "answer_sources": [0, 1, 2, 3],
        "answer_choices": [[[0], "is", "eating", "."], ["Sleeping", "."], [[3], "waves", "."], ["at", "the", [4]]],
        "answer_label": 2,
        "rationale_choices": [["Because", "."], [[1], "smiles"], ["no"], ["yes", [0, 2, 3]]],
        "rationale_sources": [0, 1, 2, 3], "rationale_match_iter": [0, 1, 2, 3], "rationale_label": 1,
        "img_id": "val-0", "question_number": 1, "annot_id": annot_id, "match_fold": "val-0", "match_index": 0,
    }
    result.update(overrides)
    return result


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.fixture
def vcr(tmp_path):
    images = tmp_path / "vcr1images" / "lsmdc_1054"
    images.mkdir(parents=True)
    Image.new("RGB", (80, 60), (10, 200, 30)).save(images / "a.jpg")
    (images / "a.json").write_text(json.dumps(METADATA))
    test_record = record("test-3")
    del test_record["answer_label"], test_record["rationale_label"]
    annotations = write_lines(tmp_path / "val.jsonl", [record(), "", test_record])
    return annotations, tmp_path / "vcr1images"


def test_ground_tokens_names_people_joins_with_and_and_tags_regions():
    grounded = ground_tokens(["What", "is", [0, 1], "doing", "near", [2], "?"], OBJECTS)
    assert grounded.words == ["what", "is", "casey", "and", "riley", "doing", "near", "car", "?"]
    assert grounded.word_region == [0, 0, 1, 0, 2, 0, 0, 3, 0]
    # Person 3 is the third person; a multi-word class name tags every word; three references.
    grounded = ground_tokens(["Is", [3, 4, 2], "here?"], OBJECTS)
    assert grounded.words == ["is", "jessie", "and", "dining", "table", "and", "car", "here", "?"]
    assert grounded.word_region == [0, 4, 0, 5, 5, 0, 3, 0, 0]


def test_person_names_wrap_around_and_can_be_replaced():
    objects = ["person"] * (len(GENDER_NEUTRAL_NAMES) + 1)
    assert ground_tokens([[len(GENDER_NEUTRAL_NAMES)]], objects).words == ["casey"]
    assert ground_tokens([[len(GENDER_NEUTRAL_NAMES) - 1]], objects).words == ["quinn"]
    grounded = ground_tokens([[0], [2]], ["person", "dog", "person"], person_names=["Ann", "Bo"])
    assert grounded.words == ["ann", "bo"] and grounded.word_region == [1, 3]


@pytest.mark.parametrize("tokens", [[[5]], [[-1]], [[]], [[0, "1"]], [3], "What", [[True]]])
def test_ground_tokens_rejects_bad_references(tokens):
    with pytest.raises(DataError):
        ground_tokens(tokens, OBJECTS)


def test_reader_reads_grounded_questions_choices_and_labels(vcr):
    annotations, root = vcr
    reader = VCRReader(annotations, root)
    assert len(reader) == 2
    item = reader[0]
    assert item.annot_id == "val-0" and item.movie == "1054_Harry_Potter"
    assert item.record == f"{annotations} line 1 (annot_id 'val-0')"
    assert item.objects == OBJECTS
    assert item.image_file == root / "lsmdc_1054/a.jpg"
    assert item.question.words[2:5] == ["casey", "and", "riley"]
    assert len(item.answer_choices) == 4 and len(item.rationale_choices) == 4
    assert item.answer_choices[0].words == ["casey", "is", "eating", "."]
    assert item.answer_choices[3].word_region == [0, 0, 5, 5]
    assert item.rationale_choices[3].words == ["yes", "casey", "and", "car", "and", "jessie"]
    assert item.rationale_choices[3].word_region == [0, 1, 0, 3, 0, 4]
    assert (item.answer_label, item.rationale_label) == (2, 1)
    test_item = reader[1]
    assert (test_item.answer_label, test_item.rationale_label) == (None, None)
    assert "line 3" in test_item.record
    assert [i.annot_id for i in reader] == ["val-0", "test-3"]


def test_person_names_run_on_across_the_dataset_as_in_the_official_code(vcr):
    # Official VCRDataset.person_name_id is never reset between questions. Record 0 has 3
    # people (objects 0, 1, 3: Casey, Riley, Jessie), so record 1's people are names 3, 4, 5:
    # Jackie, Avery, Jaime; the 14th person of the file would be Casey again (13 names).
    annotations, root = vcr
    reader = VCRReader(annotations, root)
    assert [reader.persons_before(i) for i in range(2)] == [0, 3]
    later = reader[1]
    assert later.question.words[2:5] == ["jackie", "and", "avery"]
    assert later.rationale_choices[3].words == ["yes", "jackie", "and", "car", "and", "jaime"]
    assert reader[0].question.words[2:5] == ["casey", "and", "riley"]  # any order of access
    per_image = VCRReader(annotations, root, name_counter="image")[1]
    assert per_image.question.words[2:5] == ["casey", "and", "riley"]
    assert ground_tokens([[0]], ["person"], first_person=13 + 12).words == ["quinn"]
    with pytest.raises(ValueError, match="name_counter"):
        VCRReader(annotations, root, name_counter="question")


def test_item_loads_image_and_metadata(vcr):
    item = VCRReader(*vcr)[0]
    assert item.load_image().size == (80, 60)
    metadata = item.load_metadata()
    assert metadata.boxes.shape == (5, 4) and metadata.boxes.dtype == np.float32
    np.testing.assert_array_equal(metadata.boxes[1], [0, 0, 50, 40])
    np.testing.assert_allclose(metadata.scores, [0.99, 0.9, 0.8, 0.7, 0.6], rtol=1e-6)
    assert (metadata.width, metadata.height) == (80, 60) and metadata.names == OBJECTS
    assert len(metadata.polygons[2]) == 2 and metadata.polygons[2][0].shape == (3, 2)
    assert metadata.polygons[3] == []
    masks = instance_masks(metadata)
    assert masks.shape == (5, 14, 14) and masks.dtype == np.float32
    # Box 1 [0, 0, 50, 40] filled by its polygon: x * 14 / 51 and y * 14 / 41 put the far corner
    # at (13.73, 13.66), clamped to (13, 13); the half-open crossing test leaves row 13 and
    # column 13 out, so 13 x 13 = 169 cells (the official mask of a full box).
    assert masks[1].sum() == 169 and masks[1][:13, :13].all()
    assert masks[3].sum() == 0


def _cells(rows_and_columns) -> np.ndarray:
    expected = np.zeros((14, 14), dtype=np.float32)
    for row, columns in rows_and_columns.items():
        expected[row, list(columns)] = 1.0
    return expected


def test_polygon_mask_is_the_official_half_open_crossing_test_on_box_cells():
    # Official generate_instance_mask: cells per pixel 14 / (x2 - x1 + 1); box [0, 0, 13, 13]
    # gives ratio 1. Triangle (0,0), (8,0), (0,8): a cell (row r, column c) is inside when
    # c < 8 - r (strictly left of the hypotenuse), for r in 0..7 (row 8 only touches a vertex):
    # rows of 8, 7, ..., 1 cells = 36.
    triangle = _cells({r: range(8 - r) for r in range(8)})
    mask = polygon_masks([[[0, 0], [8, 0], [0, 8]]], [0, 0, 13, 13])
    assert mask.shape == (14, 14) and mask.dtype == np.float32 and mask.sum() == 36
    np.testing.assert_array_equal(mask, triangle)
    # The same triangle in image pixels of box [100, 50, 127, 77] (28 pixels: ratio 0.5).
    np.testing.assert_array_equal(polygon_masks([[[100, 50], [116, 50], [100, 66]]], [100, 50, 127, 77, 0.9]), triangle)


def test_polygon_mask_scales_clamps_and_unions_like_the_official_code():
    # Box [10, 20, 24, 34]: ratio 14 / 15. The left-half rectangle x 10..17, y 20..34 maps to
    # x 0..6.53, y 0..13.07 -> clamped 13: rows 0..12, columns 0..6 (c < 6.53) = 91 cells.
    mask = polygon_masks([[[10, 20], [17, 20], [17, 34], [10, 34]]], [10, 20, 24, 34])
    np.testing.assert_array_equal(mask, _cells({r: range(7) for r in range(13)}))
    # A polygon larger than the box is clamped to [0, 13]: rows and columns 0..12 = 169.
    mask = polygon_masks([[[-5, -5], [20, -5], [20, 20], [-5, 20]]], [0, 0, 13, 13])
    np.testing.assert_array_equal(mask, _cells({r: range(13) for r in range(13)}))
    # Two squares (0..4 and 6..10) in one instance: 16 + 16 cells.
    union = polygon_masks([[[0, 0], [4, 0], [4, 4], [0, 4]], [[6, 6], [10, 6], [10, 10], [6, 10]]], [0, 0, 13, 13])
    expected = _cells({**{r: range(4) for r in range(4)}, **{r: range(6, 10) for r in range(6, 10)}})
    np.testing.assert_array_equal(union, expected)
    # Fewer than 3 points encloses nothing.
    assert polygon_masks([[[0, 0], [5, 5]]], [0, 0, 13, 13]).sum() == 0
    # A zero-width box [3, 3, 3, 9] still has x2 - x1 + 1 = 1 pixel: ratios 14 and 2. The
    # triangle (0,0), (5,0), (5,5) maps to (0,0), (13,0), (13,4) after clamping; inside when
    # 13 r / 4 <= c < 13 for r in 0..3: 13 + 9 + 6 + 3 = 31 cells.
    mask = polygon_masks([[[0, 0], [5, 0], [5, 5]]], [3, 3, 3, 9])
    np.testing.assert_array_equal(mask, _cells({0: range(13), 1: range(4, 13), 2: range(7, 13), 3: range(10, 13)}))


def test_masks_are_computed_from_the_boxes_as_written_in_the_file():
    metadata = parse_vcr_metadata(json.dumps({
        "boxes": [[0, 0, 0.1, 13, 1.0]], "segms": [[]], "width": 14, "height": 14}).encode(), "m.json")
    assert metadata.file_boxes.dtype == np.float64 and metadata.file_boxes[0, 2] == 0.1  # float32: 0.10000000149
    # With file_boxes [0, 0, 13, 13] (ratio 1) the triangle (0,0), (8,0), (0,8) sets 36 cells;
    # the float32 `boxes` [0, 0, 27, 27] (ratio 0.5) would give (0,0), (4,0), (0,4): 10 cells.
    triangle = [np.asarray([[0, 0], [8, 0], [0, 8]], np.float32)]
    metadata = VCRMetadata(
        boxes=np.asarray([[0, 0, 27, 27]], np.float32), scores=np.ones(1, np.float32), polygons=[triangle],
        width=28, height=28, file_boxes=np.asarray([[0, 0, 13, 13]], np.float64),
    )
    assert instance_masks(metadata)[0].sum() == 36


def test_read_vcr_metadata_reads_a_file(vcr):
    _, root = vcr
    assert read_vcr_metadata(root / "lsmdc_1054" / "a.json").boxes.shape == (5, 4)
    with pytest.raises(DataError, match="cannot read"):
        read_vcr_metadata(root / "missing.json")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"question": ["Is", [5], "ok"]}, "'question'"),
        ({"answer_choices": [["a"], ["b"], ["c"]]}, "'answer_choices'"),
        ({"rationale_choices": [["a"], ["b"], ["c"], ["d"], ["e"]]}, "'rationale_choices'"),
        ({"answer_choices": [["a"], ["b"], ["c"], ["d", [7]]]}, "'answer_choices'"),
        ({"answer_label": 4}, "'answer_label'"),
        ({"rationale_label": -1}, "'rationale_label'"),
        ({"answer_label": "1"}, "'answer_label'"),
        ({"objects": "person"}, "'objects'"),
        ({"img_fn": 3}, "'img_fn'"),
        ({"question": []}, "'question'"),
    ],
)
def test_malformed_record_names_file_line_annot_id_and_field(tmp_path, overrides, field):
    path = write_lines(tmp_path / "train.jsonl", [record("train-9", **overrides)])
    with pytest.raises(DataError) as error:
        VCRReader(path, tmp_path)[0]
    message = str(error.value)
    assert f"{path} line 1 (annot_id 'train-9')" in message and f"field {field}" in message


def test_missing_key_and_bad_json_are_reported(tmp_path):
    no_question = record("train-1")
    del no_question["question"]
    path = write_lines(tmp_path / "train.jsonl", [no_question, "{oops", "[1, 2]"])
    reader = VCRReader(path, tmp_path)
    with pytest.raises(DataError, match=r"line 1 \(annot_id 'train-1'\), field 'question': missing"):
        reader[0]
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        reader[1]
    with pytest.raises(DataError, match="line 3: expected a JSON object"):
        reader[2]


def write_metadata(vcr, **overrides):
    annotations, root = vcr
    metadata = copy.deepcopy(METADATA)
    metadata.update(overrides)
    (root / "lsmdc_1054" / "a.json").write_text(json.dumps(metadata))
    return VCRReader(annotations, root)[0]


@pytest.mark.parametrize(
    "overrides, inner",
    [
        ({"segms": METADATA["segms"][:4]}, "field 'segms'"),
        ({"boxes": [[10, 20, 5, 34, 0.9]] + METADATA["boxes"][1:]}, "field 'boxes'"),
        ({"boxes": [[10, 20, 24, 34]] + METADATA["boxes"][1:]}, "field 'boxes'"),
        ({"segms": [[[[1, 2], [3]]]] + METADATA["segms"][1:]}, "field 'segms'"),
        ({"width": 0}, "field 'width'"),
    ],
)
def test_malformed_metadata_is_reported_when_loaded(vcr, overrides, inner):
    item = write_metadata(vcr, **overrides)
    with pytest.raises(DataError) as error:
        item.load_metadata()
    message = str(error.value)
    assert "line 1 (annot_id 'val-0'), field 'metadata_fn'" in message
    assert inner in message and "a.json" in message


def test_objects_must_match_metadata_boxes(vcr):
    item = write_metadata(vcr, boxes=METADATA["boxes"][:4], segms=METADATA["segms"][:4], names=OBJECTS[:4])
    with pytest.raises(DataError, match=r"annot_id 'val-0'\), field 'objects': 5 objects but 4 boxes"):
        item.load_metadata()


def test_missing_image_and_metadata_files_raise_only_when_read(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [record("train-2", img_fn="m/x.jpg", metadata_fn="m/x.json")])
    item = VCRReader(path, tmp_path / "vcr1images")[0]
    with pytest.raises(DataError, match=r"annot_id 'train-2'\), field 'img_fn': cannot read file .*x\.jpg"):
        item.load_image()
    with pytest.raises(DataError, match=r"annot_id 'train-2'\), field 'metadata_fn': cannot read file .*x\.json"):
        item.load_metadata()


def test_skip_mode_skips_bad_lines(tmp_path):
    lines = [record("a-0"), record("a-1", answer_label=9), "not json", record("a-3")]
    path = write_lines(tmp_path / "train.jsonl", lines)
    reader = VCRReader(path, tmp_path, skip_bad_records=True)
    assert [item.annot_id for item in reader] == ["a-0", "a-3"]
    assert len(reader.skipped) == 2 and "annot_id 'a-1'" in reader.skipped[0]
    with pytest.raises(DataError):
        list(VCRReader(path, tmp_path))


@FUZZ
@given(
    key=st.sampled_from(["objects", "question", "answer_choices", "rationale_choices", "answer_label",
                         "rationale_label", "img_fn", "metadata_fn", "annot_id", "movie"]),
    value=JSON_VALUES,
    raw=st.binary(max_size=80),
)
@example(key="img_fn", value="\x00", raw=b"")  # a NUL byte in a file name once escaped as ValueError
@example(key="metadata_fn", value="a.zip@/b\x00", raw=b"")
def test_fuzz_records_only_data_error_or_success(tmp_path, key, value, raw):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(json.dumps(record(**{key: value})).encode() + b"\n" + raw.replace(b"\n", b" ") + b"\n")
    reader = VCRReader(path, tmp_path, skip_bad_records=True)
    items = list(reader)
    assert len(items) + len(reader.skipped) == len(reader)
    for item in items:
        for method in (item.load_image, item.load_metadata):
            try:
                method()
            except DataError:
                pass


@FUZZ
@given(key=st.sampled_from(["boxes", "segms", "names", "width", "height"]), value=JSON_VALUES,
       raw=st.binary(max_size=100), use_raw=st.booleans())
def test_fuzz_metadata_only_data_error_or_success(key, value, raw, use_raw):
    data = raw if use_raw else json.dumps(dict(METADATA, **{key: value})).encode()
    try:
        metadata = parse_vcr_metadata(data, "fuzz.json")
    except DataError:
        return
    assert instance_masks(metadata).shape == (len(metadata.boxes), 14, 14)
