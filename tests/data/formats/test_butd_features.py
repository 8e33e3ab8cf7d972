import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import (
    DEFAULT_FIELDS,
    ButdTsvReader,
    index_tsv,
    read_at,
    read_feature_json,
    read_npz,
)

RNG = np.random.default_rng(0)
BOXES = np.array([[0, 0, 10, 10], [5, 5, 39, 29], [1.5, 2.5, 3.5, 4.5]], np.float32)
FEATURES = RNG.standard_normal((3, 8)).astype(np.float32)
SCORES = RNG.random((3, 5)).astype(np.float32)
WHOLE = RNG.standard_normal(8).astype(np.float32)


def b64(array) -> str:
    return base64.b64encode(np.asarray(array, dtype=np.float32).tobytes()).decode("ascii")


def tsv_line(image_id="42", width=40, height=30, num_boxes=None, boxes=BOXES, features=FEATURES,
             extra=()) -> str:
    num_boxes = len(boxes) if num_boxes is None else num_boxes
    fields = [str(image_id), str(width), str(height), str(num_boxes),
              boxes if isinstance(boxes, str) else b64(boxes),
              features if isinstance(features, str) else b64(features), *extra]
    return "\t".join(fields)


def write_tsv(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def assert_same(record, image_id, boxes=BOXES, features=FEATURES, width=40, height=30):
    assert record.image_id == image_id
    assert (record.image_width, record.image_height) == (width, height)
    assert record.boxes.dtype == np.float32 and record.features.dtype == np.float32
    np.testing.assert_array_equal(record.boxes, boxes)
    np.testing.assert_array_equal(record.features, features)


# --- TSV -------------------------------------------------------------------------------------


def test_tsv_reads_every_line_with_values_and_record(tmp_path):
    second = FEATURES[:2] * 2
    path = write_tsv(tmp_path / "trainval.tsv", [
        tsv_line("42"), "", tsv_line("COCO_val2014_000000000042", 640, 480, boxes=BOXES[:2],
                                     features=second)])
    records = list(ButdTsvReader(path))
    assert len(records) == 2
    assert_same(records[0], "42")
    assert records[0].record == f"{path} line 1 image_id 42"
    assert records[0].class_scores is None and records[0].image_box_feature is None
    assert_same(records[1], "COCO_val2014_000000000042", BOXES[:2], second, 640, 480)
    assert records[1].record == f"{path} line 3 image_id COCO_val2014_000000000042"
    assert records[0].features.flags.writeable


def test_tsv_iteration_streams_line_by_line(tmp_path):
    path = write_tsv(tmp_path / "f.tsv", [tsv_line("1"), tsv_line("2"), "broken line"])
    iterator = iter(ButdTsvReader(path))
    assert next(iterator).image_id == "1"
    assert next(iterator).image_id == "2"  # the bad third line has not been read yet
    with pytest.raises(DataError, match="line 3"):
        next(iterator)


def test_tsv_extra_columns_and_lxmert_names(tmp_path):
    fields = ("img_id", "img_w", "img_h", "num_boxes", "boxes", "features", "cls_prob",
              "objects_id", "image_box_feature")
    line = tsv_line("7", extra=(b64(SCORES), "ignored", b64(WHOLE)))
    path = write_tsv(tmp_path / "f.tsv", [line])
    (record,) = ButdTsvReader(path, fieldnames=fields)
    assert_same(record, "7")
    np.testing.assert_array_equal(record.class_scores, SCORES)
    np.testing.assert_array_equal(record.image_box_feature, WHOLE)


def test_tsv_fieldnames_without_required_column_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="features"):
        ButdTsvReader(tmp_path / "f.tsv", fieldnames=DEFAULT_FIELDS[:-1])


def test_tsv_python3_bytes_repr_is_decoded(tmp_path):
    line = tsv_line("1", num_boxes=3, boxes=f"b'{b64(BOXES)}'", features=f"b'{b64(FEATURES)}'")
    (record,) = ButdTsvReader(write_tsv(tmp_path / "f.tsv", [line]))
    assert_same(record, "1")


def test_tsv_random_access_by_index(tmp_path):
    lines = [tsv_line(str(i), features=FEATURES + i) for i in range(4)]
    path = write_tsv(tmp_path / "f.tsv", lines[:2] + [""] + lines[2:])
    offsets = index_tsv(path)
    assert list(offsets) == ["0", "1", "2", "3"]
    for image_id in ["3", "0", "2"]:
        record = read_at(path, offsets[image_id])
        assert_same(record, image_id, features=FEATURES + int(image_id))
        assert record.record == f"{path} byte offset {offsets[image_id]} image_id {image_id}"
    with pytest.raises(DataError, match="not the start of a line"):
        read_at(path, offsets["1"] + 5)
    with pytest.raises(DataError, match="no record"):
        read_at(path, path.stat().st_size)


def test_tsv_index_rejects_repeated_id(tmp_path):
    path = write_tsv(tmp_path / "f.tsv", [tsv_line("5"), tsv_line("6"), tsv_line("5")])
    with pytest.raises(DataError, match=r"line 3, field 'image_id': image_id 5 repeats line 1"):
        index_tsv(path)


NAN_FEATURES = FEATURES.copy()
NAN_FEATURES[1, 3] = np.nan
INF_BOXES = BOXES.copy()
INF_BOXES[2, 0] = np.inf
INVERTED = BOXES.copy()
INVERTED[1] = [20, 5, 10, 29]
OUTSIDE = BOXES.copy()
OUTSIDE[1, 2] = 41.5  # width 40: more than 1 px outside

MALFORMED_TSV = {
    "undecodable boxes": (dict(boxes="not*base64"), "boxes", "not valid base64"),
    "boxes not float32": (dict(boxes=base64.b64encode(b"12345").decode()), "boxes", "multiple of 4"),
    "boxes wrong count": (dict(num_boxes=2), "boxes", "num_boxes is 2"),
    "features wrong length": (dict(features=b64(FEATURES.ravel()[:-1])), "features", "num_boxes"),
    "num_boxes zero": (dict(num_boxes=0), "num_boxes", "positive integer"),
    "num_boxes text": (dict(num_boxes="many"), "num_boxes", "positive integer"),
    "nan feature": (dict(features=NAN_FEATURES), "features", "row 1 holds NaN"),
    "inf box": (dict(boxes=INF_BOXES), "boxes", "row 2 holds NaN or infinite"),
    "inverted box": (dict(boxes=INVERTED), "boxes", "box 1 .* x2 < x1"),
    "box outside": (dict(boxes=OUTSIDE), "boxes", "box 1 .* outside the 40 x 30 image"),
    "zero width": (dict(width=0), "image_w", "positive integer"),
    "negative height": (dict(height=-3), "image_h", "positive integer"),
    "fractional width": (dict(width="40.5"), "image_w", "positive integer"),
}


@pytest.mark.parametrize("case", MALFORMED_TSV, ids=list(MALFORMED_TSV))
def test_tsv_malformed_line_names_file_record_and_field(tmp_path, case):
    overrides, field, message = MALFORMED_TSV[case]
    path = write_tsv(tmp_path / "bad.tsv", [tsv_line("1"), tsv_line("77", **overrides)])
    with pytest.raises(DataError, match=message) as raised:
        list(ButdTsvReader(path))
    assert str(raised.value).startswith(f"{path} line 2 image_id 77, field {field!r}: ")


def test_tsv_wrong_field_count_and_empty_id(tmp_path):
    path = write_tsv(tmp_path / "bad.tsv", ["1\t40\t30"])
    with pytest.raises(DataError, match=r"bad.tsv line 1: expected 6 tab-separated fields .* got 3"):
        list(ButdTsvReader(path))
    path = write_tsv(tmp_path / "bad.tsv", [tsv_line(" ")])
    with pytest.raises(DataError, match=r"bad.tsv line 1, field 'image_id': empty"):
        list(ButdTsvReader(path))


def test_tsv_box_within_one_pixel_is_accepted(tmp_path):
    boxes = BOXES.copy()
    boxes[0] = [-0.9, -1.0, 40.9, 31.0]
    (record,) = ButdTsvReader(write_tsv(tmp_path / "f.tsv", [tsv_line("1", boxes=boxes)]))
    np.testing.assert_array_equal(record.boxes, boxes)


def test_tsv_skip_mode_collects_messages(tmp_path):
    path = write_tsv(tmp_path / "f.tsv", [tsv_line("1"), tsv_line("2", num_boxes=9), tsv_line("3")])
    reader = ButdTsvReader(path, skip_bad_records=True)
    assert [record.image_id for record in reader] == ["1", "3"]
    assert len(reader.skipped) == 1
    assert "line 2 image_id 2, field 'boxes'" in reader.skipped[0]


def test_tsv_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.tsv"):
        list(ButdTsvReader(tmp_path / "missing.tsv"))


FIELD_TEXT = st.one_of(
    st.text(max_size=12),
    st.integers(-5, 50).map(str),
    st.sampled_from(["nan", "inf", "1e400", "1" + "0" * 400, "40.0", "", " "]),
    st.lists(st.floats(width=32), max_size=12).map(b64),
)


VALID_FIELDS = tsv_line("1").split("\t")
# A valid line with one field replaced, or arbitrary fields.
FUZZ_LINE = st.one_of(
    st.tuples(st.integers(0, 5), FIELD_TEXT).map(
        lambda pair: "\t".join(VALID_FIELDS[:pair[0]] + [pair[1]] + VALID_FIELDS[pair[0] + 1:])),
    st.lists(FIELD_TEXT, max_size=8).map("\t".join),
)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(FUZZ_LINE, max_size=3),
       raw=st.binary(max_size=40))
def test_tsv_fuzz_only_data_error(tmp_path, lines, raw):
    path = tmp_path / "fuzz.tsv"
    path.write_bytes("\n".join(lines).encode("utf-8") + b"\n" + raw)
    try:
        list(ButdTsvReader(path))
    except DataError:
        pass
    try:
        for offset in index_tsv(path).values():
            read_at(path, offset)
    except DataError:
        pass


# --- npz -------------------------------------------------------------------------------------


def test_npz_standard_keys(tmp_path):
    path = tmp_path / "123.npz"
    np.savez(path, boxes=BOXES, features=FEATURES, image_w=40, image_h=30, cls_prob=SCORES,
             num_boxes=3)
    record = read_npz(path)
    assert_same(record, "123")
    np.testing.assert_array_equal(record.class_scores, SCORES)
    assert record.record == str(path)


def test_npz_x_stored_as_d_by_n_is_transposed(tmp_path):
    path = tmp_path / "a.npz"
    np.savez_compressed(path, bbox=BOXES.astype(np.float64), x=FEATURES.T, image_width=40,
                        image_height=30, num_bbox=3, image_id="COCO_1")
    record = read_npz(path)
    assert_same(record, "COCO_1")
    assert record.features.flags.c_contiguous


def test_npz_x_stored_as_n_by_d(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, boxes=BOXES, x=FEATURES, image_w=40, image_h=30, image_id=9)
    assert_same(read_npz(path), "9")


@pytest.mark.parametrize("overrides, field, message", [
    (dict(features=None), "features", "missing"),
    (dict(image_w=None), "image_w", "missing"),
    (dict(num_boxes=4), "num_boxes", "is 4 but boxes holds 3"),
    (dict(features=FEATURES[:2]), "features", "does not hold 3 boxes"),
    (dict(boxes=BOXES[:, :3]), "boxes", r"expected shape \[N >= 1, 4\]"),
    (dict(features=NAN_FEATURES), "features", "NaN"),
    (dict(boxes=INVERTED), "boxes", "x2 < x1"),
    (dict(image_h=0), "image_h", "positive integer"),
    (dict(features=np.array(["a", "b"])), "features", "numeric"),
])
def test_npz_malformed_names_file_and_field(tmp_path, overrides, field, message):
    arrays = dict(boxes=BOXES, features=FEATURES, image_w=40, image_h=30)
    arrays.update(overrides)
    path = tmp_path / "bad.npz"
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    with pytest.raises(DataError, match=message) as raised:
        read_npz(path)
    assert str(raised.value).startswith(f"{path}, field {field!r}: ")


def test_npz_never_unpickles(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, boxes=BOXES, features=np.array([object()] * 3, dtype=object),
             image_w=40, image_h=30)
    with pytest.raises(DataError, match=r"pickled.npz, field 'features': cannot be read"):
        read_npz(path)
    plain = tmp_path / "plain.npy"
    np.save(plain, FEATURES)
    with pytest.raises(DataError, match="single .npy array"):
        read_npz(plain)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="garbage.npz"):
        read_npz(garbage)


# --- VL-BERT json ----------------------------------------------------------------------------


def vlbert_json(**overrides) -> dict:
    content = {"image_id": 42, "image_w": 40, "image_h": 30, "num_boxes": 3,
               "boxes": b64(BOXES), "features": b64(FEATURES), "classes": b64(SCORES),
               "image_box_feature": b64(WHOLE)}
    content.update(overrides)
    return {key: value for key, value in content.items() if value is not None}


def test_json_reads_all_fields(tmp_path):
    path = tmp_path / "42.json"
    path.write_text(json.dumps(vlbert_json()))
    record = read_feature_json(path)
    assert_same(record, "42")
    np.testing.assert_array_equal(record.class_scores, SCORES)
    np.testing.assert_array_equal(record.image_box_feature, WHOLE)
    assert record.record == str(path)


def test_json_image_id_defaults_to_file_stem(tmp_path):
    path = tmp_path / "COCO_val2014_000000000042.json"
    path.write_text(json.dumps(vlbert_json(image_id=None, classes=None, image_box_feature=None)))
    record = read_feature_json(path)
    assert record.image_id == "COCO_val2014_000000000042"
    assert record.class_scores is None and record.image_box_feature is None


@pytest.mark.parametrize("overrides, field, message", [
    (dict(features=None), "features", "missing"),
    (dict(num_boxes=None), "num_boxes", "missing"),
    (dict(num_boxes=2), "boxes", "num_boxes is 2"),
    (dict(boxes="%%%"), "boxes", "not valid base64"),
    (dict(features=b64(NAN_FEATURES)), "features", "NaN"),
    (dict(boxes=b64(OUTSIDE)), "boxes", "outside"),
    (dict(image_w=-1), "image_w", "positive integer"),
    (dict(image_box_feature=b64(WHOLE[:5])), "image_box_feature", "expected D = 8"),
    (dict(classes=b64(SCORES.ravel()[:-1])), "classes", "multiple of num_boxes"),
    (dict(image_id=[1]), "image_id", "integer or a string"),
])
def test_json_malformed_names_file_and_field(tmp_path, overrides, field, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(vlbert_json(**overrides)))
    with pytest.raises(DataError, match=message) as raised:
        read_feature_json(path)
    assert str(raised.value).startswith(f"{path}, field {field!r}: ")


def test_json_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_feature_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="bad.json: expected a JSON object"):
        read_feature_json(path)
