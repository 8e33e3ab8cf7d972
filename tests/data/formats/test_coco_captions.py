import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlblocks.data.errors import DataError
from vlblocks.data.formats.coco_captions import CocoCaptionsReader, basic_tokenize

FUZZ = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -1, 0, 1, 2.5])
    | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def document(annotations=None, images=None) -> dict:
    return {
        "info": {"year": 2014},
        "licenses": [],
        "images": images if images is not None else [
            {"id": 57870, "file_name": "COCO_train2014_000000057870.jpg", "width": 640, "height": 480,
             "license": 5, "coco_url": "http://x"},
            {"id": 384029, "file_name": "COCO_train2014_000000384029.jpg", "width": 427, "height": 640},
        ],
        "annotations": annotations if annotations is not None else [
            {"id": 787980, "image_id": 57870, "caption": "A restaurant has modern wooden tables and chairs."},
            {"id": 789366, "image_id": 384029, "caption": "A man, riding a Bike!"},
            {"id": 789888, "image_id": 57870, "caption": "  Café tables   "},
        ],
    }


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def captions(tmp_path):
    return write(tmp_path / "captions_train2014.json", document())


def test_reads_captions_with_image_info_in_order(captions, tmp_path):
    reader = CocoCaptionsReader(captions, image_root=tmp_path / "train2014")
    assert len(reader) == 3
    second = reader[1]
    assert (second.caption_id, second.image_id) == (789366, 384029)
    assert second.caption == "A man, riding a Bike!"
    assert second.caption_tokens == ["a", "man", ",", "riding", "a", "bike", "!"]
    assert second.image_file == tmp_path / "train2014" / "COCO_train2014_000000384029.jpg"
    assert (second.image_width, second.image_height) == (427, 640)
    assert str(captions) in second.record and "789366" in second.record
    assert reader[-1].caption_tokens == ["cafe", "tables"]
    assert [item.caption_id for item in reader] == [787980, 789366, 789888]


def test_image_file_is_none_without_root_and_index_out_of_range_raises(captions):
    reader = CocoCaptionsReader(captions)
    assert reader[0].image_file is None
    with pytest.raises(IndexError):
        reader[3]


def test_basic_tokenize_splits_punctuation_and_lower_cases():
    assert basic_tokenize("Don't STOP-now.") == ["don", "'", "t", "stop", "-", "now", "."]
    assert basic_tokenize("   ") == []


@pytest.mark.parametrize(
    "annotation, field",
    [
        ({"id": 7, "image_id": 999, "caption": "a dog"}, "'image_id'"),
        ({"id": 7, "image_id": 57870, "caption": ""}, "'caption'"),
        ({"id": 7, "image_id": 57870, "caption": " \t "}, "'caption'"),
        ({"id": 7, "image_id": 57870}, "'caption'"),
        ({"id": 7, "image_id": 57870, "caption": ["a", "dog"]}, "'caption'"),
        ({"id": 7, "caption": "a dog"}, "'image_id'"),
        ({"id": 7, "image_id": "57870", "caption": "a dog"}, "'image_id'"),
        ({"id": 7, "image_id": True, "caption": "a dog"}, "'image_id'"),
    ],
)
def test_malformed_annotation_names_file_annotation_and_field(tmp_path, annotation, field):
    path = write(tmp_path / "captions_val2014.json", document(annotations=[annotation]))
    with pytest.raises(DataError) as error:
        CocoCaptionsReader(path)[0]
    message = str(error.value)
    assert str(path) in message and "annotation id 7" in message and f"field {field}" in message


def test_annotation_without_usable_id_is_named_by_position(tmp_path):
    path = write(tmp_path / "c.json", document(annotations=[{"id": "x", "image_id": 57870, "caption": "a"}]))
    with pytest.raises(DataError, match=r"annotation #0, field 'id'"):
        CocoCaptionsReader(path)[0]


@pytest.mark.parametrize(
    "image, field",
    [
        ({"id": 57870, "file_name": "a.jpg", "width": -3, "height": 480}, "'width'"),
        ({"id": 57870, "file_name": "a.jpg", "width": 640, "height": "480"}, "'height'"),
        ({"id": 57870, "width": 640, "height": 480}, "'file_name'"),
    ],
)
def test_malformed_image_entry_is_reported_for_its_annotation(tmp_path, image, field):
    annotations = [{"id": 8, "image_id": 57870, "caption": "a dog"}]
    path = write(tmp_path / "c.json", document(annotations=annotations, images=[image]))
    with pytest.raises(DataError, match=rf"annotation id 8, field {field}"):
        CocoCaptionsReader(path)[0]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"images": []}, "field 'annotations'"),
        ({"annotations": []}, "field 'images'"),
        (document(images=[{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]), r"images\[1\].*duplicate"),
        (document(images=[{"file_name": "a"}]), r"images\[0\], field 'id'"),
    ],
)
def test_malformed_file_raises_when_opened(tmp_path, content, pattern):
    path = write(tmp_path / "c.json", content)
    with pytest.raises(DataError, match=pattern):
        CocoCaptionsReader(path)


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        CocoCaptionsReader(tmp_path / "nope.json")


def test_skip_mode_skips_bad_annotations_and_records_why(tmp_path):
    annotations = document()["annotations"] + [
        {"id": 1, "image_id": 5, "caption": "orphan"},
        {"id": 2, "image_id": 57870, "caption": ""},
    ]
    path = write(tmp_path / "c.json", document(annotations=annotations))
    reader = CocoCaptionsReader(path, skip_bad_records=True)
    assert [item.caption_id for item in reader] == [787980, 789366, 789888]
    assert len(reader.skipped) == 2 and "annotation id 1" in reader.skipped[0]
    with pytest.raises(DataError):
        list(CocoCaptionsReader(path))


@FUZZ
@given(
    key=st.sampled_from(["id", "image_id", "caption", None]),
    value=JSON_VALUES,
    image_key=st.sampled_from(["id", "file_name", "width", "height", None]),
    image_value=JSON_VALUES,
)
def test_fuzz_fields_only_data_error_or_success(tmp_path, key, value, image_key, image_value):
    doc = document()
    if key is not None:
        doc["annotations"][1][key] = value
    if image_key is not None:
        doc["images"][1][image_key] = image_value
    path = write(tmp_path / "fuzz.json", doc)
    try:
        reader = CocoCaptionsReader(path, image_root=tmp_path, skip_bad_records=True)
        items = list(reader)
        assert len(items) + len(reader.skipped) == len(reader)
    except DataError:
        pass


@FUZZ
@given(value=JSON_VALUES, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_fuzz_whole_file_only_data_error_or_success(tmp_path, value, raw, use_raw):
    path = tmp_path / "fuzz.json"
    if use_raw:
        path.write_bytes(raw)
    else:
        write(path, {"images": document()["images"], "annotations": value})
    try:
        reader = CocoCaptionsReader(path, skip_bad_records=True)
        list(reader)
    except DataError:
        pass
