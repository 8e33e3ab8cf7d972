"""Conceptual Captions read from the zipped and the unzipped layout (official ZIP_MODE true / false).

The official reader (pretrain/data/datasets/conceptual_captions.py) keeps the annotation's
`train_image.zip@/00000000.jpg` / `train_frcnn.zip@/00000000.json` paths in zip mode and, with
ZIP_MODE false (every shipped pre-training config), removes `.zip@` from both and `.0`..`.3` from
the detection path: `train_image/00000000.jpg`, `train_frcnn/00000000.json`.
"""

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader


def b64(array) -> str:
    return base64.b64encode(np.asarray(array, dtype=np.float32).tobytes()).decode("ascii")


def jpeg(width: int, height: int, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# Two images. Image 0: boxes whose max class score (background column included) is 0.3, 0.8
# -> read order [1, 0]. Image 1: one box.
DETECTIONS = {
    "00000000.json": {"image_id": "00000000", "image_w": 40, "image_h": 30, "num_boxes": 2,
                      "boxes": b64([[0, 0, 9, 9], [5, 5, 20, 25]]), "classes": b64([[0.3, 0.2, 0.1], [0.1, 0.1, 0.8]])},
    "00000001.json": {"image_id": "00000001", "image_w": 64, "image_h": 48, "num_boxes": 1,
                      "boxes": b64([[1, 2, 3, 4]]), "classes": b64([[0.5, 0.5, 0.0]])},
}
IMAGES = {"00000000.jpg": jpeg(40, 30, (250, 0, 0)), "00000001.jpg": jpeg(64, 48, (0, 0, 250))}
# The lines as the official gen_train_image_json.py writes them (captions split on spaces).
LINES = [
    {"image": "train_image.zip@/00000000.jpg", "caption": ["a", "red", "square"], "frcnn": "train_frcnn.zip@/00000000.json"},
    {"image": "train_image.zip@/00000001.jpg", "caption": ["a", "blue", "one"], "frcnn": "train_frcnn.zip@/00000001.json"},
]


def write_annotation(folder, lines=LINES):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_frcnn.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_zipped(folder, frcnn_archive="train_frcnn.zip"):
    """`zip -0 ../train_image.zip ./*` in the image folder: members named without a folder."""
    with zipfile.ZipFile(folder / "train_image.zip", "w", zipfile.ZIP_STORED) as archive:
        for name, data in IMAGES.items():
            archive.writestr(name, data)
    with zipfile.ZipFile(folder / frcnn_archive, "w", zipfile.ZIP_STORED) as archive:
        for name, detection in DETECTIONS.items():
            archive.writestr(name, json.dumps(detection))


def write_unzipped(folder):
    (folder / "train_image").mkdir(parents=True)
    (folder / "train_frcnn").mkdir(parents=True)
    for name, data in IMAGES.items():
        (folder / "train_image" / name).write_bytes(data)
    for name, detection in DETECTIONS.items():
        (folder / "train_frcnn" / name).write_text(json.dumps(detection))


@pytest.fixture(autouse=True)
def fresh_zip_cache():
    zipped.clear_cache()
    yield
    zipped.clear_cache()


def summary(reader):
    """Caption, size, boxes and the red/blue channel of the image centre of every record."""
    rows = []
    for example in reader:
        centre = example.load_image().getpixel((example.image_width // 2, example.image_height // 2))
        rows.append((example.caption, example.image_width, example.image_height, example.boxes.tolist(), centre[0] > 200, centre[2] > 200))
    return rows


# Hand-written from DETECTIONS / IMAGES: image 0 boxes reordered [1, 0], red; image 1 blue.
EXPECTED = [
    (["a", "red", "square"], 40, 30, [[5, 5, 20, 25], [0, 0, 9, 9]], True, False),
    (["a", "blue", "one"], 64, 48, [[1, 2, 3, 4]], False, True),
]


def test_zipped_and_unzipped_layouts_give_the_same_records(tmp_path):
    zipped_annotation = write_annotation(tmp_path / "zipped")
    write_zipped(tmp_path / "zipped")
    unzipped_annotation = write_annotation(tmp_path / "unzipped")
    write_unzipped(tmp_path / "unzipped")
    assert summary(ConceptualCaptionsReader(zipped_annotation)) == EXPECTED
    assert summary(ConceptualCaptionsReader(unzipped_annotation)) == EXPECTED
    assert summary(ConceptualCaptionsReader(zipped_annotation, zip_mode=True)) == EXPECTED
    assert summary(ConceptualCaptionsReader(unzipped_annotation, zip_mode=False)) == EXPECTED


def test_unzipped_paths_are_the_official_ones(tmp_path, monkeypatch):
    annotation = write_annotation(tmp_path)
    write_unzipped(tmp_path)
    calls = []
    real = zipped.read_bytes
    monkeypatch.setattr(zipped, "read_bytes", lambda path, root: calls.append(str(path)) or real(path, root))
    ConceptualCaptionsReader(annotation)[1].load_image()
    assert calls == ["train_frcnn/00000001.json", "train_image/00000001.jpg"]


def test_sharded_detection_archives_unzip_into_one_folder(tmp_path):
    # official: 'train_frcnn.2.zip@/00000000.json' -> remove '.zip@' -> 'train_frcnn.2/00000000.json'
    # -> remove '.2' -> 'train_frcnn/00000000.json'
    lines = [dict(LINES[0], frcnn="train_frcnn.2.zip@/00000000.json"), dict(LINES[1], frcnn="train_frcnn.3.zip@/00000001.json")]
    annotation = write_annotation(tmp_path / "unzipped", lines)
    write_unzipped(tmp_path / "unzipped")
    assert summary(ConceptualCaptionsReader(annotation)) == EXPECTED
    # zipped, the shard archives are read as they are named
    annotation = write_annotation(tmp_path / "zipped", lines[:1])
    write_zipped(tmp_path / "zipped", frcnn_archive="train_frcnn.2.zip")
    assert summary(ConceptualCaptionsReader(annotation)) == EXPECTED[:1]


def test_unzipped_folder_wins_when_both_layouts_are_there(tmp_path):
    annotation = write_annotation(tmp_path)
    write_unzipped(tmp_path)
    write_zipped(tmp_path)
    (tmp_path / "train_frcnn" / "00000000.json").write_text(json.dumps(dict(DETECTIONS["00000000.json"], image_w=41)))
    assert ConceptualCaptionsReader(annotation)[0].image_width == 41  # ZIP_MODE false: the folder
    assert ConceptualCaptionsReader(annotation, zip_mode=True)[0].image_width == 40


def test_neither_layout_names_the_record_field_and_both_paths(tmp_path):
    annotation = write_annotation(tmp_path)
    with pytest.raises(DataError) as raised:
        ConceptualCaptionsReader(annotation)[1]
    message = str(raised.value)
    assert "train_frcnn.json line 2" in message and "field 'frcnn'" in message
    assert str(tmp_path / "train_frcnn" / "00000001.json") in message
    assert str(tmp_path / "train_frcnn.zip") in message and "'00000001.json'" in message


def test_missing_image_in_either_layout_names_the_field(tmp_path):
    annotation = write_annotation(tmp_path)
    write_unzipped(tmp_path)
    (tmp_path / "train_image" / "00000001.jpg").unlink()
    example = ConceptualCaptionsReader(annotation)[1]
    with pytest.raises(DataError, match=r"line 2, field 'image': neither the unzipped file .*train_image/00000001\.jpg"):
        example.load_image()


def test_forced_modes_do_not_fall_back(tmp_path):
    annotation = write_annotation(tmp_path)
    write_zipped(tmp_path)
    with pytest.raises(DataError, match=r"line 1, field 'frcnn'.*train_frcnn/00000000\.json"):
        ConceptualCaptionsReader(annotation, zip_mode=False)[0]
    other = write_annotation(tmp_path / "folders")
    write_unzipped(tmp_path / "folders")
    with pytest.raises(DataError, match=r"line 1, field 'frcnn'.*train_frcnn\.zip"):
        ConceptualCaptionsReader(other, zip_mode=True)[0]


def test_unzipped_path_mapping():
    assert zipped.unzipped_path("train_image.zip@/00000000.jpg") == "train_image/00000000.jpg"
    assert zipped.unzipped_path("/data/cc/val_frcnn.1.zip@/a/b.json", (".0", ".1")) == "/data/cc/val_frcnn/a/b.json"
    assert zipped.unzipped_path("plain/file.jpg") is None
