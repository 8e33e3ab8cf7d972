"""Conceptual Captions in the official VL-BERT layout: jsonlines annotations, images and detections.

Layout (paths relative to the annotation file's folder)::

    train_frcnn.json   one JSON object per line:
                       {"image": "train_image.zip@/00000000.jpg",
                        "caption": ["a", "red", "car", ...],
                        "frcnn": "train_frcnn.zip@/00000000.json"}
    train_image/       the images (or train_image.zip holding them)
    train_frcnn/       one bottom-up-attention detection JSON per image (or train_frcnn.zip
                       holding them): image_w, image_h, num_boxes, boxes (base64 float32 [N, 4]
                       x1, y1, x2, y2), classes (base64 float32 [N, C] class scores, column 0 =
                       background) and optionally features (base64 float32 [N, D]).

The annotation always names zip members; the official reader (pretrain/data/datasets/
conceptual_captions.py) takes them from the unzipped folders unless `ZIP_MODE` is on, and every
shipped pre-training config has it off. There `.zip@` is removed from both paths and, from the
detection path, the shard numbers `.0`..`.3` (`train_frcnn.2.zip@/x.json` → `train_frcnn/x.json`).
`ConceptualCaptionsReader` reads either layout, per file, by default the folder when the file is
there and the archive otherwise (`zip_mode`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image, ImageOps

from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.formats.records import (
    FieldError,
    SkippingReader,
    get_field,
    index_lines,
    positive_int,
    record_error,
    record_index,
)

CaptionRecord = tuple[list[str], bytes, np.ndarray, np.ndarray, Optional[np.ndarray]]

_FLOAT_BYTES = 4
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)
# Fixed member timestamps keep written archives byte-identical across runs.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# Removed from a detection archive's name to find its unzipped folder (the official reader removes
# them from the whole path; only the archive name holds them in its data).
_FRCNN_SHARD_SUFFIXES = (".0", ".1", ".2", ".3")
# `"num_boxes": 36`: the key with a whole number of at most 18 digits (an int64).
_NUM_BOXES = re.compile(rb'"num_boxes"\s*:\s*(\d{1,18})\s*[,}]')


class ConceptualCaptionsReader(SkippingReader[ImageTextExample]):
    """Random-access reader of a `{split}_frcnn.json` annotation file.

    Only the byte offset of each line is kept in memory; a record is parsed, and its detections
    read, when it is accessed. Boxes are returned sorted by descending max class
    score (background column included), ties kept in file order.

    Args:
        annotation_file: the jsonlines annotation file.
        skip_bad_records: when iterating, skip malformed records and append their messages to
            `skipped` instead of raising. Indexing always raises.
        zip_mode: where the `x.zip@/member` paths of the annotation are read: None (default)
            from the unzipped folder `x/member` when that file exists, else from the archive;
            True only from archives (official `ZIP_MODE: true`); False only from folders
            (`ZIP_MODE: false`, the official configs' setting).

    Raises:
        DataError: the annotation file cannot be read; or, on access, a record is malformed.
    """

    def __init__(self, annotation_file: str | Path, skip_bad_records: bool = False, zip_mode: Optional[bool] = None) -> None:
        self.annotation_file = Path(annotation_file)
        self.root = self.annotation_file.parent
        self.skip_bad_records = skip_bad_records
        self.zip_mode = zip_mode
        self.skipped: list[str] = []
        self._name = str(annotation_file)
        self._starts, self._ends, self._line_numbers = self._index_lines()

    def _index_lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Byte range and 1-based line number of every non-blank line."""
        starts, ends, numbers = index_lines(self.annotation_file, self._name)
        return (
            np.asarray(starts, dtype=np.int64),
            np.asarray(ends, dtype=np.int64),
            np.asarray(numbers, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> ImageTextExample:
        line, where = self._line(index)
        try:
            return _parse_record(line, where, self.root, self.zip_mode)
        except FieldError as error:
            raise record_error(where, error) from None

    def length(self, index: int) -> int:
        """Caption words + detected boxes of record `index`: what length bucketing sorts by.

        Reads the caption and the detection file's `num_boxes` without decoding its base64
        arrays (`bench/conceptual_captions_lengths.py` times both ways), so it checks only those
        two fields: a record whose arrays, image or image size are malformed is reported when
        it is read for training instead.

        Raises:
            DataError: the annotation line, its caption, the detection file or its `num_boxes`
                is malformed (file, line and field named).
        """
        line, where = self._line(index)
        try:
            record, caption, frcnn_path = _annotation(line)
            return len(caption) + _box_count(_detection_bytes(frcnn_path, self.root, self.zip_mode), frcnn_path)
        except FieldError as error:
            raise record_error(where, error) from None

    def _line(self, index: int) -> tuple[bytes, str]:
        """Record `index`'s annotation line and where it is (`file line N`)."""
        index = record_index(index, len(self), f"records in {self._name}")
        with open(self.annotation_file, "rb") as handle:
            handle.seek(int(self._starts[index]))
            line = handle.read(int(self._ends[index] - self._starts[index]))
        return line, f"{self._name} line {int(self._line_numbers[index])}"


def _parse_record(line: bytes, where: str, root: Path, zip_mode: Optional[bool] = None) -> ImageTextExample:
    """Parses one annotation line and its detection file into an example (unsorted input ok)."""
    record, caption, frcnn_path = _annotation(line)
    image_path = _string(get_field(record, "image"), "image")
    detection = _detection(_detection_bytes(frcnn_path, root, zip_mode), frcnn_path)
    width = positive_int(get_field(detection, "image_w"), "image_w")
    height = positive_int(get_field(detection, "image_h"), "image_h")
    num_boxes = positive_int(get_field(detection, "num_boxes"), "num_boxes")
    boxes = _array(get_field(detection, "boxes"), "boxes", num_boxes, columns=4)
    _check_box_order(boxes)
    class_scores = _array(get_field(detection, "classes"), "classes", num_boxes)
    features = None
    if detection.get("features") is not None:
        features = _array(detection["features"], "features", num_boxes)
    order = np.argsort(-class_scores.max(axis=1), kind="stable")
    return ImageTextExample(
        record=where,
        caption=caption,
        image_width=width,
        image_height=height,
        boxes=boxes[order],
        class_scores=class_scores[order],
        features=None if features is None else features[order],
        load_image=functools.partial(_load_image, image_path, root, where, zip_mode),
    )


def _json_object(data: bytes, field: Optional[str] = None, name: str = "") -> dict:
    """The JSON object in `data`: an annotation line (`field` None) or the file `name` of `field`."""
    prefix = f"{name} is " if name else ""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, too long an integer, depth
        raise FieldError(field, f"{prefix}not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise FieldError(field, f"{prefix}not a JSON object" if name else f"expected a JSON object, got {type(value).__name__}")
    return value


def _annotation(line: bytes) -> tuple[dict, list[str], str]:
    """An annotation line's object, its caption and its detection file's path."""
    record = _json_object(line)
    return record, _caption(get_field(record, "caption")), _string(get_field(record, "frcnn"), "frcnn")


def _detection_bytes(frcnn_path: str, root: Path, zip_mode: Optional[bool]) -> bytes:
    """The bytes of the detection file a record names."""
    try:
        return zipped.read_zipped_or_unzipped(frcnn_path, root, zip_mode, _FRCNN_SHARD_SUFFIXES)
    except DataError as error:
        raise FieldError("frcnn", str(error)) from None


def _detection(data: bytes, frcnn_path: str) -> dict:
    """A detection file's JSON object."""
    return _json_object(data, "frcnn", frcnn_path)


def _box_count(data: bytes, frcnn_path: str) -> int:
    """A detection file's `num_boxes`, read from its bytes when the file is one flat object with
    no escapes (one `{`, no `[`, no backslash; base64 holds none of them) in which `"num_boxes"`
    occurs once, followed by a whole number: then every quote delimits a string and that one is
    the key. Otherwise (nesting, escapes, a repeated or fractional value) from the parsed JSON,
    which also reports what is wrong."""
    flat = data.count(b"{") == 1 and b"[" not in data and b"\\" not in data and data.count(b'"num_boxes"') == 1
    found = _NUM_BOXES.search(data) if flat else None
    if found is not None:
        return positive_int(int(found.group(1)), "num_boxes")
    return positive_int(get_field(_detection(data, frcnn_path), "num_boxes"), "num_boxes")


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(field, f"expected a non-empty path string, got {value!r}")
    return value


def _caption(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise FieldError("caption", f"expected a list of words, got {type(value).__name__}")
    if not value:
        raise FieldError("caption", "empty caption")
    for position, word in enumerate(value):
        if not isinstance(word, str) or not word.strip():
            raise FieldError("caption", f"word {position} is not a non-empty string: {word!r}")
    return list(value)


def _array(value: Any, field: str, rows: int, columns: Optional[int] = None) -> np.ndarray:
    """Decodes base64 float32 data into [rows, columns]; columns is inferred when None."""
    if not isinstance(value, str):
        raise FieldError(field, f"expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise FieldError(field, f"not valid base64 ({error})") from None
    row_multiple = _FLOAT_BYTES * (columns if columns is not None else 1)
    if columns is not None and len(raw) % row_multiple:
        raise FieldError(
            field, f"base64 decodes to {len(raw)} bytes, expected a multiple of {row_multiple}"
        )
    if columns is not None and len(raw) // row_multiple != rows:
        raise FieldError(
            field, f"holds {len(raw) // row_multiple} rows but num_boxes is {rows}"
        )
    if columns is None:
        row_bytes = _FLOAT_BYTES * rows
        if not raw or len(raw) % row_bytes:
            raise FieldError(
                field,
                f"base64 decodes to {len(raw)} bytes, expected a non-zero multiple of "
                f"{row_bytes} (num_boxes = {rows} rows of float32)",
            )
        columns = len(raw) // row_bytes
    array = np.frombuffer(raw, dtype=np.float32).reshape(rows, columns).copy()
    if not np.isfinite(array).all():
        bad_row = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
        raise FieldError(field, f"row {bad_row} holds NaN or infinite values")
    return array


def _check_box_order(boxes: np.ndarray) -> None:
    """Boxes must have x2 >= x1 and y2 >= y1."""
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise FieldError(
            "boxes", f"box {row} {boxes[row].tolist()} has x2 < x1 or y2 < y1"
        )


def _load_image(image_path: str, root: Path, where: str, zip_mode: Optional[bool] = None) -> Image.Image:
    """Reads and decodes an image (EXIF orientation applied) as RGB."""
    try:
        data = zipped.read_zipped_or_unzipped(image_path, root, zip_mode)
    except DataError as error:
        raise DataError(f"{where}, field 'image': {error}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}, field 'image': cannot decode {image_path} ({error})") from None


def write_conceptual_captions(
    directory: Path, split: str, records: Iterable[CaptionRecord]
) -> Path:
    """Writes records in the official layout: `{split}_frcnn.json`, `{split}_image.zip`, `{split}_frcnn.zip`.

    Args:
        directory: output folder (created if missing).
        split: split name, e.g. "train" or "val".
        records: (caption words, JPEG or PNG image bytes, boxes [N, 4] x1 y1 x2 y2,
            class scores [N, C] with column 0 = background, features [N, D] or None).

    Returns:
        The annotation file path. Image width and height are read from the image bytes; written
        files are byte-identical for identical input.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    annotation_path = directory / f"{split}_frcnn.json"
    image_zip_name, frcnn_zip_name = f"{split}_image.zip", f"{split}_frcnn.zip"
    with (
        zipfile.ZipFile(directory / image_zip_name, "w", zipfile.ZIP_STORED) as image_zip,
        zipfile.ZipFile(directory / frcnn_zip_name, "w", zipfile.ZIP_STORED) as frcnn_zip,
        open(annotation_path, "w", encoding="utf-8", newline="\n") as annotations,
    ):
        for index, (caption, image_bytes, boxes, class_scores, features) in enumerate(records):
            extension, width, height = _image_info(image_bytes, index)
            detection = _detection_json(index, width, height, boxes, class_scores, features)
            image_member = f"{index:08d}{extension}"
            frcnn_member = f"{index:08d}.json"
            image_zip.writestr(zipfile.ZipInfo(image_member, _ZIP_DATE_TIME), image_bytes)
            frcnn_zip.writestr(zipfile.ZipInfo(frcnn_member, _ZIP_DATE_TIME), detection)
            line = {
                "image": f"{image_zip_name}@/{image_member}",
                "caption": [str(word) for word in caption],
                "frcnn": f"{frcnn_zip_name}@/{frcnn_member}",
            }
            annotations.write(json.dumps(line) + "\n")
    zipped.clear_cache()
    return annotation_path


def _image_info(image_bytes: bytes, index: int) -> tuple[str, int, int]:
    """File extension and displayed (EXIF-rotated) size of encoded image bytes."""
    try:
        image = Image.open(io.BytesIO(image_bytes))
    except OSError as error:
        raise ValueError(f"record {index}: image bytes cannot be decoded ({error})") from None
    extensions = {"JPEG": ".jpg", "PNG": ".png"}
    if image.format not in extensions:
        raise ValueError(f"record {index}: expected JPEG or PNG image bytes, got {image.format}")
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
        width, height = height, width
    return extensions[image.format], width, height


def _detection_json(
    index: int,
    width: int,
    height: int,
    boxes: np.ndarray,
    class_scores: np.ndarray,
    features: Optional[np.ndarray],
) -> str:
    """The bottom-up-attention JSON of one image."""
    boxes = np.asarray(boxes, dtype=np.float32)
    class_scores = np.asarray(class_scores, dtype=np.float32)
    count = len(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or count == 0:
        raise ValueError(f"record {index}: boxes must be [N, 4] with N >= 1, got {boxes.shape}")
    if class_scores.ndim != 2 or len(class_scores) != count or class_scores.shape[1] == 0:
        raise ValueError(
            f"record {index}: class scores must be [{count}, C], got {class_scores.shape}"
        )
    detection: dict[str, Any] = {
        "image_w": width,
        "image_h": height,
        "num_boxes": count,
        "boxes": b64_float32(boxes),
        "classes": b64_float32(class_scores),
    }
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) != count or features.shape[1] == 0:
            raise ValueError(f"record {index}: features must be [{count}, D], got {features.shape}")
        detection["features"] = b64_float32(features)
    return json.dumps(detection)


def b64_float32(array: np.ndarray) -> str:
    """An array as base64 of its float32 bytes: how VL-BERT's feature files store arrays."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")
