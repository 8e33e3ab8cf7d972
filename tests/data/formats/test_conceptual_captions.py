import base64
import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader, write_conceptual_captions


def b64(array) -> str:
    return base64.b64encode(np.asarray(array, dtype=np.float32).tobytes()).decode("ascii")


def jpeg_bytes(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def detection(boxes, classes, width=40, height=30, features=None, **overrides) -> dict:
    boxes, classes = np.asarray(boxes, np.float32), np.asarray(classes, np.float32)
    result = {"image_id": "x", "image_w": width, "image_h": height, "num_boxes": len(boxes),
              "boxes": b64(boxes), "classes": b64(classes)}
    if features is not None:
        result["features"] = b64(features)
    result.update(overrides)
    return result


def write_dataset(folder, lines, detections, images=None, split="train"):
    """Writes the official layout by hand (zip members named without '/', addressed as `zip@/name`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{split}_frcnn.zip", "w") as archive:
        for name, content in detections.items():
            archive.writestr(name, content if isinstance(content, str) else json.dumps(content))
    with zipfile.ZipFile(folder / f"{split}_image.zip", "w") as archive:
        for name, content in (images or {}).items():
            archive.writestr(name, content)
    annotation = folder / f"{split}_frcnn.json"
    annotation.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return annotation


def line(index: int, caption=("a", "red", "car"), split="train") -> dict:
    return {"image": f"{split}_image.zip@/{index:08d}.jpg", "caption": list(caption),
            "frcnn": f"{split}_frcnn.zip@/{index:08d}.json"}


BOXES = [[0, 0, 10, 10], [5, 5, 20, 25], [1, 2, 3, 4], [10, 0, 39, 29]]
# max per row (background included): 0.5, 0.9 (background), 0.7, 0.5 -> order 1, 2, 0, 3 (stable tie)
CLASSES = [[0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]
FEATURES = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)


@pytest.fixture
def dataset(tmp_path):
    detections = {
        "00000000.json": detection(BOXES, CLASSES, features=FEATURES),
        "00000001.json": detection(BOXES[:2], CLASSES[:2], width=64, height=48),
    }
    images = {"00000000.jpg": jpeg_bytes(40, 30), "00000001.jpg": jpeg_bytes(64, 48, (0, 0, 250))}
    lines = [line(0), line(1, ["two", "blue", "birds", "."])]
    return write_dataset(tmp_path / "cc", lines, detections, images)


def test_reads_official_layout_and_sorts_boxes_by_max_score_including_background(dataset):
    reader = ConceptualCaptionsReader(dataset)
    assert len(reader) == 2
    first = reader[0]
    assert first.caption == ["a", "red", "car"]
    assert (first.image_width, first.image_height) == (40, 30)
    order = [1, 2, 0, 3]
    np.testing.assert_array_equal(first.boxes, np.asarray(BOXES, np.float32)[order])
    np.testing.assert_array_equal(first.class_scores, np.asarray(CLASSES, np.float32)[order])
    np.testing.assert_array_equal(first.features, FEATURES[order])
    assert first.boxes.dtype == np.float32 and first.class_scores.shape == (4, 3)
    assert "line 1" in first.record and "train_frcnn.json" in first.record
    second = reader[1]
    assert second.features is None and second.caption == ["two", "blue", "birds", "."]
    assert "line 2" in second.record


def test_image_is_loaded_lazily_from_zip_member(dataset, monkeypatch):
    calls = []
    real = zipped.read_bytes
    monkeypatch.setattr(zipped, "read_bytes", lambda path, root: calls.append(str(path)) or real(path, root))
    example = ConceptualCaptionsReader(dataset)[1]
    assert calls == ["train_frcnn.zip@/00000001.json"]
    image = example.load_image()
    assert calls[-1] == "train_image.zip@/00000001.jpg"
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((10, 10))[2] > 200


def test_paths_are_relative_to_the_annotation_folder(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # a working directory where the relative paths do not exist
    reader = ConceptualCaptionsReader(os.path.relpath(dataset, tmp_path.parent))
    assert reader[0].load_image().size == (40, 30)


def test_random_access_equals_iteration(dataset):
    reader = ConceptualCaptionsReader(dataset)
    iterated = list(reader)
    assert len(iterated) == 2
    for index, example in enumerate(iterated):
        again = reader[index]
        assert again.caption == example.caption and again.record == example.record
        np.testing.assert_array_equal(again.boxes, example.boxes)
    assert reader[-1].caption == reader[1].caption
    with pytest.raises(IndexError):
        reader[2]


def test_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path):
    detections = {"00000000.json": detection(BOXES, CLASSES)}
    annotation = write_dataset(tmp_path, ["", json.dumps(line(0)), "   "], detections)
    reader = ConceptualCaptionsReader(annotation)
    assert len(reader) == 1 and reader[0].record.endswith("line 2")


def test_zip_members_with_leading_slash_are_found(tmp_path):
    detections = {"/00000000.json": detection(BOXES, CLASSES)}
    annotation = write_dataset(tmp_path, [line(0)], detections)
    assert ConceptualCaptionsReader(annotation)[0].boxes.shape == (4, 4)


def good_detection(**overrides):
    """A valid detection JSON with some fields replaced by raw (possibly broken) values."""
    return {**detection(BOXES, CLASSES), **overrides}


MALFORMED = {
    "json": ('{"image": "train_image.zip@/00000000.jpg", "caption": [', None, "not valid JSON"),
    "missing_caption": ({"image": "train_image.zip@/00000000.jpg", "frcnn": "train_frcnn.zip@/00000000.json"},
                        "caption", "missing"),
    "caption_not_list": (dict(line(0), caption="a red car"), "caption", "list"),
    "caption_not_strings": (dict(line(0), caption=["a", 3]), "caption", "word 1"),
    "caption_empty": (dict(line(0), caption=[]), "caption", "empty"),
    "missing_frcnn": ({"image": "train_image.zip@/00000000.jpg", "caption": ["a"]}, "frcnn", "missing"),
    "boxes_length": (good_detection(boxes=base64.b64encode(bytes(44)).decode()), "boxes",
                     "44 bytes, expected a multiple of 16"),
    "boxes_not_base64": (good_detection(boxes="@@not base64@@"), "boxes", "base64"),
    "boxes_count": (good_detection(num_boxes=3), "boxes", "num_boxes is 3"),
    "classes_length": (good_detection(classes=b64(np.zeros(7))), "classes", "28 bytes"),
    "features_length": (good_detection(features=b64(np.zeros(6))), "features", "24 bytes"),
    "features_nan": (good_detection(features=b64(np.full((4, 2), np.nan))), "features", "row 0"),
    "nan": (good_detection(classes=b64(np.full((4, 3), np.nan))), "classes", "NaN"),
    "inf": (good_detection(boxes=b64([[0, 0, np.inf, 1]] * 4)), "boxes", "NaN or infinite"),
    "box_order": (good_detection(boxes=b64([[0, 0, 1, 1], [5, 5, 4, 9], [0, 0, 1, 1], [0, 0, 1, 1]])), "boxes",
                  "box 1"),
    "box_order_y": (good_detection(boxes=b64([[0, 9, 1, 8]] * 4)), "boxes", "y2 < y1"),
    "width": (good_detection(image_w=0), "image_w", "positive"),
    "height": (good_detection(image_h=-3), "image_h", "positive"),
    "height_not_int": (good_detection(image_h="30"), "image_h", "positive"),
    "missing_boxes": ({k: v for k, v in good_detection().items() if k != "boxes"}, "boxes", "missing"),
    "missing_classes": ({k: v for k, v in good_detection().items() if k != "classes"}, "classes", "missing"),
    "detection_json": ("{broken", "frcnn", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_names_file_line_and_field(tmp_path, case):
    content, field, detail = MALFORMED[case]
    detections = {"00000000.json": good_detection(), "00000001.json": good_detection()}
    lines = [line(0)]
    if case in {"json", "missing_caption", "caption_not_list", "caption_not_strings", "caption_empty", "missing_frcnn"}:
        lines.append(content)
    else:
        detections["00000001.json"] = content
        lines.append(line(1))
    annotation = write_dataset(tmp_path, lines, detections)
    reader = ConceptualCaptionsReader(annotation)
    reader[0]
    with pytest.raises(DataError) as raised:
        reader[1]
    message = str(raised.value)
    assert "train_frcnn.json line 2" in message
    if field is not None:
        assert f"field '{field}'" in message
    assert detail in message


def test_skip_bad_records_counts_and_continues(tmp_path):
    detections = {f"{i:08d}.json": good_detection() for i in range(5)}
    detections["00000001.json"] = good_detection(num_boxes=2)
    lines = [line(0), line(1), "not json", line(3), dict(line(4), caption=[])]
    annotation = write_dataset(tmp_path, lines, detections)
    strict = ConceptualCaptionsReader(annotation)
    with pytest.raises(DataError, match="line 2"):
        list(strict)
    reader = ConceptualCaptionsReader(annotation, skip_bad_records=True)
    kept = list(reader)
    assert [example.record.split()[-1] for example in kept] == ["1", "4"]
    assert len(reader.skipped) == 3
    assert ["line 2" in reader.skipped[0], "line 3" in reader.skipped[1], "line 5" in reader.skipped[2]] == [True] * 3
    with pytest.raises(DataError):
        reader[1]  # indexing always raises
    list(reader)
    assert len(reader.skipped) == 3  # counted per pass, not accumulated


def test_missing_zip_member_and_archive_are_named(tmp_path):
    annotation = write_dataset(tmp_path, [line(0), line(1)], {"00000000.json": good_detection()})
    reader = ConceptualCaptionsReader(annotation)
    with pytest.raises(DataError) as raised:
        reader[1]
    message = str(raised.value)
    assert "line 2" in message and "field 'frcnn'" in message and "00000001.json" in message
    assert "train_frcnn.zip" in message
    # the image member is missing too, which only shows when the image is loaded
    example = reader[0]
    with pytest.raises(DataError, match=r"field 'image'.*train_image\.zip.*00000000\.jpg"):
        example.load_image()
    (tmp_path / "train_frcnn.zip").unlink()
    with pytest.raises(DataError, match=r"train_frcnn\.zip.*00000000\.json"):
        reader[0]


def test_missing_annotation_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        ConceptualCaptionsReader(tmp_path / "nope.json")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_zip_cache_reuses_open_archive_and_reopens_after_fork(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/y.txt", b"hello")
        archive.writestr("z.txt", b"world")
    zipped.clear_cache()
    assert zipped.read_bytes("a.zip@/x/y.txt", tmp_path) == b"hello"
    assert zipped.read_bytes(str(path) + "@z.txt", tmp_path) == b"world"
    assert len(zipped._archives) == 1
    key = next(iter(zipped._archives))
    assert key[0] == os.getpid()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = zipped.read_bytes("a.zip@/z.txt", tmp_path) == b"world"
            ok = ok and all(key[0] == os.getpid() for key in zipped._archives)
            os.write(write_fd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read_fd, 1) == b"1"
    assert zipped.read_bytes("a.zip@/x/y.txt", tmp_path) == b"hello"
    with pytest.raises(DataError, match=r"a\.zip.*'missing\.txt'"):
        zipped.read_bytes("a.zip@/missing.txt", tmp_path)
    with pytest.raises(DataError, match=r"b\.zip.*'q\.txt'"):
        zipped.read_bytes("b.zip@/q.txt", tmp_path)
    (tmp_path / "plain.txt").write_bytes(b"plain")
    assert zipped.read_bytes("plain.txt", tmp_path) == b"plain"
    with pytest.raises(DataError, match="nothing.txt"):
        zipped.read_bytes("nothing.txt", tmp_path)


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.new("RGB", (33, 21), (1, 2, 3)).save(png, format="PNG")
    boxes = np.asarray([[0, 0, 5, 5], [2, 3, 30, 20], [1, 1, 2, 2]], np.float32)
    scores = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    features = rng.normal(size=(3, 8)).astype(np.float32)
    records = [
        (["one", "png", "."], png.getvalue(), boxes, scores, features),
        (["a", "jpeg"], jpeg_bytes(50, 40), boxes[:1], scores[:1], None),
    ]
    annotation = write_conceptual_captions(tmp_path / "out", "val", records)
    assert annotation == tmp_path / "out" / "val_frcnn.json"
    raw_lines = annotation.read_text().splitlines()
    assert json.loads(raw_lines[0]) == {"image": "val_image.zip@/00000000.png", "caption": ["one", "png", "."],
                                        "frcnn": "val_frcnn.zip@/00000000.json"}
    assert json.loads(raw_lines[1])["image"] == "val_image.zip@/00000001.jpg"
    with zipfile.ZipFile(tmp_path / "out" / "val_frcnn.zip") as archive:
        stored = json.loads(archive.read("00000000.json"))
    assert (stored["image_w"], stored["image_h"], stored["num_boxes"]) == (33, 21, 3)
    reader = ConceptualCaptionsReader(annotation)
    first, second = reader[0], reader[1]
    order = np.argsort(-scores.max(axis=1), kind="stable")
    np.testing.assert_array_equal(first.boxes, boxes[order])
    np.testing.assert_array_equal(first.class_scores, scores[order])
    np.testing.assert_array_equal(first.features, features[order])
    assert first.load_image().getpixel((0, 0)) == (1, 2, 3)
    assert (second.image_width, second.image_height) == (50, 40) and second.features is None
    assert second.load_image().size == (50, 40)
    again = write_conceptual_captions(tmp_path / "again", "val", records)
    for name in ["val_frcnn.json", "val_image.zip", "val_frcnn.zip"]:
        assert (again.parent / name).read_bytes() == (annotation.parent / name).read_bytes()


def test_exif_orientation_is_applied_on_load_and_by_the_writer(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    records = [(["tall"], buffer.getvalue(), np.zeros((1, 4), np.float32), np.ones((1, 2), np.float32), None)]
    example = ConceptualCaptionsReader(write_conceptual_captions(tmp_path, "train", records))[0]
    assert (example.image_width, example.image_height) == (10, 30)
    assert example.load_image().size == (10, 30)


def _raw_detection(keys_first: bool, **extra) -> str:
    """A detection JSON written by hand: `num_boxes` before or after the arrays, spaced as
    Python 2's json module spaced it, with extra fields."""
    fields = {"boxes": b64(BOXES), "classes": b64(CLASSES), "image_w": 40, "image_h": 30, **extra}
    items = [f'"{key}": {json.dumps(value)}' for key, value in fields.items()]
    count = '"num_boxes" : 4'
    return "{" + ", ".join([count, *items] if keys_first else [*items, count]) + "}"


def test_lengths_count_caption_words_and_boxes_without_decoding_the_arrays(tmp_path):
    detections = {
        "00000000.json": _raw_detection(True),
        "00000001.json": _raw_detection(False, features=b64(FEATURES)),
        "00000002.json": _raw_detection(False, note='"num_boxes": 99, in a string'),  # escaped quotes: not the key
        "00000003.json": good_detection(num_boxes=4.0),  # a whole float: read by parsing
        "00000004.json": _raw_detection(True, classes="@@not base64@@"),
    }
    lines = [line(0), line(1, ["two", "birds"]), line(2, ["one"]), line(3), line(4)]
    reader = ConceptualCaptionsReader(write_dataset(tmp_path, lines, detections))
    assert [reader.length(index) for index in range(5)] == [7, 6, 5, 7, 7]
    for index in range(4):
        example = reader[index]
        assert reader.length(index) == len(example.caption) + len(example.boxes)
    with pytest.raises(DataError, match="field 'classes'"):
        reader[4]  # the arrays are checked when the record is read, not by its length


@pytest.mark.parametrize("content, field, detail", [
    (good_detection(num_boxes=0), "num_boxes", "positive"),
    (good_detection(num_boxes=4.5), "num_boxes", "positive"),
    ({k: v for k, v in good_detection().items() if k != "num_boxes"}, "num_boxes", "missing"),
    ('{"num_boxes": 4, "num_boxes": 5}', "num_boxes", None),  # twice: parsed, and the last one counts
    ("{broken", "frcnn", "not valid JSON"),
])
def test_a_bad_length_names_file_line_and_field(tmp_path, content, field, detail):
    reader = ConceptualCaptionsReader(write_dataset(tmp_path, [line(0), line(1)], {"00000000.json": good_detection(), "00000001.json": content}))
    assert reader.length(0) == 7
    if detail is None:
        assert reader.length(1) == 3 + 5
        return
    with pytest.raises(DataError) as raised:
        reader.length(1)
    assert "train_frcnn.json line 2" in str(raised.value) and f"field '{field}'" in str(raised.value) and detail in str(raised.value)


@pytest.mark.parametrize("content", [
    '{"meta": {"num_boxes": 5}, "num_boxes": 10.0}',  # nested
    '{"x\\"num_boxes": 7, "num_boxes": 3.0}',  # an escaped quote inside a key
    '{"num\\u005fboxes": 10, "extra": {"num_boxes": 5}}',  # the key spelled with an escape
    '{"num_boxes": 2.0, "list": [{"num_boxes": 9}]}',
    '{"num_boxes": 4, "num_boxes": 5.0}',  # repeated: the last one counts
    '{"num_boxes": 4, "name": "num_boxes"}',
])
def test_a_length_counts_the_boxes_that_parsing_finds(tmp_path, content):
    reader = ConceptualCaptionsReader(write_dataset(tmp_path, [line(0)], {"00000000.json": content}))
    assert reader.length(0) == 3 + int(json.loads(content)["num_boxes"])


def test_a_bad_caption_or_missing_detection_file_fails_the_length(tmp_path):
    lines = [dict(line(0), caption=[]), line(1)]
    reader = ConceptualCaptionsReader(write_dataset(tmp_path, lines, {"00000000.json": good_detection()}))
    with pytest.raises(DataError, match="line 1, field 'caption'"):
        reader.length(0)
    with pytest.raises(DataError, match="line 2, field 'frcnn'.*00000001.json"):
        reader.length(1)


@pytest.mark.parametrize("content", ['{"num_boxes": ' + "9" * 5000 + "}", "[" * 100000])
def test_json_too_deep_or_with_too_long_an_integer_is_a_data_error(tmp_path, content):
    reader = ConceptualCaptionsReader(write_dataset(tmp_path, [line(0)], {"00000000.json": content}))
    for read in (lambda: reader[0], lambda: reader.length(0)):
        with pytest.raises(DataError, match="line 1, field 'frcnn'.*not valid JSON"):
            read()
