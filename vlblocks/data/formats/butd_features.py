"""Bottom-up-attention region features in their three common on-disk layouts.

- TSV, as written by peteanderson80/bottom-up-attention `tools/generate_tsv.py`: one image per
  line, tab separated, no header, fields `image_id, image_w, image_h, num_boxes, boxes,
  features` where `boxes` is base64 float32 [N, 4] (x1, y1, x2, y2 in pixels) and `features`
  base64 float32 [N, D] (D inferred, 2048 for the ResNet-101 detector). Files with more columns
  are read by passing their `fieldnames`: `cls_prob` (or `classes`) is decoded as class scores
  [N, C], `image_box_feature` as [D]; other extra columns are ignored. LXMERT's names `img_id`,
  `img_w`, `img_h` are accepted for the first three.
- One `.npz` per image: `boxes` (or `bbox`) [N, 4]; `features` [N, D] or `x` [N, D] or [D, N]
  (the layout is told apart by N); `image_w`/`image_h` (or `image_width`/`image_height`);
  optional `num_boxes`/`num_bbox`, `image_id` (else the file stem), `cls_prob`/`classes` [N, C],
  `image_box_feature` [D]. Loaded with `allow_pickle=False`: pickles are never executed.
- VL-BERT's precomputed `<image_id>.json`: `image_id` (else the file stem), `image_w`,
  `image_h`, `num_boxes`, base64 float32 `boxes`, `features`, optional `classes` [N, C] and
  `image_box_feature` [D].

Every reader validates what it returns: base64 that does not decode or has the wrong length,
`num_boxes` disagreeing with the arrays, NaN or infinite values, boxes with x2 < x1 or y2 < y1 or
lying outside the image by more than 1 px, a non-positive image size and missing fields all raise
`DataError` naming the file, the record (line and image id, or file name) and the field.
"""

from __future__ import annotations

import base64
import binascii
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from vlblocks.data.errors import DataError
from vlblocks.data.formats.records import FieldError, get_field, parse_json_object, positive_int, record_error

DEFAULT_FIELDS: tuple[str, ...] = (
    "image_id", "image_w", "image_h", "num_boxes", "boxes", "features"
)

_FLOAT_BYTES = 4
_BOX_TOLERANCE_PX = 1.0
_HUGE_PX = 1e30
# Role of each known TSV column name; the first name of a role in `fieldnames` is used.
_TSV_ROLES = {
    "image_id": "image_id",
    "img_id": "image_id",
    "image_w": "image_w",
    "img_w": "image_w",
    "image_h": "image_h",
    "img_h": "image_h",
    "num_boxes": "num_boxes",
    "boxes": "boxes",
    "features": "features",
    "cls_prob": "class_scores",
    "classes": "class_scores",
    "image_box_feature": "image_box_feature",
}
_REQUIRED_ROLES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class RegionFeatures:
    """Detected regions of one image with their precomputed features.

    Attributes:
        record: where it came from, for error messages (e.g. "trainval.tsv line 3 image_id 42").
        image_id: the image's id as text ("42", "COCO_val2014_000000000042", ...).
        image_width, image_height: image size in pixels, the detector's `image_w`, `image_h`.
        boxes: [N, 4] float32 (x1, y1, x2, y2) in pixels, N >= 1.
        features: [N, D] float32 region features.
        class_scores: [N, C] float32 detector class distribution, or None.
        image_box_feature: [D] float32 feature of the whole-image box, or None.
    """

    record: str
    image_id: str
    image_width: int
    image_height: int
    boxes: np.ndarray
    features: np.ndarray
    class_scores: Optional[np.ndarray] = None
    image_box_feature: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------------------------
# TSV


class _TsvLayout:
    """Column position and file name of each role, from the caller's `fieldnames`."""

    def __init__(self, fieldnames: Sequence[str]) -> None:
        names = list(fieldnames)
        if len(set(names)) != len(names):
            raise ValueError(f"fieldnames has duplicates: {names}")
        self.names = names
        self.columns: dict[str, tuple[int, str]] = {}
        for position, name in enumerate(names):
            role = _TSV_ROLES.get(name)
            if role is not None and role not in self.columns:
                self.columns[role] = (position, name)
        missing = [role for role in _REQUIRED_ROLES if role not in self.columns]
        if missing:
            raise ValueError(f"fieldnames {names} lack {missing}")

    def name(self, role: str) -> str:
        return self.columns[role][1]


class ButdTsvReader:
    """Streams the images of a bottom-up-attention TSV file, one line at a time.

    Args:
        path: the TSV file.
        fieldnames: its columns in order (the file has no header).
        skip_bad_records: when iterating, skip malformed lines and append their messages to
            `skipped` instead of raising.

    Raises:
        ValueError: `fieldnames` lacks a required column.
        DataError: the file cannot be read; or a line is malformed (unless skipped).
    """

    def __init__(
        self,
        path: str | Path,
        fieldnames: Sequence[str] = DEFAULT_FIELDS,
        skip_bad_records: bool = False,
    ) -> None:
        self.path = Path(path)
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self._layout = _TsvLayout(fieldnames)

    def __iter__(self) -> Iterator[RegionFeatures]:
        self.skipped = []
        name = str(self.path)
        with _open_binary(self.path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = _parse_line(line, self._layout, f"{name} line {number}")
                except DataError as error:
                    if not self.skip_bad_records:
                        raise
                    self.skipped.append(str(error))
                    continue
                yield record


def index_tsv(path: str | Path, fieldnames: Sequence[str] = DEFAULT_FIELDS) -> dict[str, int]:
    """Byte offset of every image's line, by image id (only the id column is parsed).

    Raises:
        DataError: the file cannot be read, a line has no id column, or an id repeats.
    """
    layout = _TsvLayout(fieldnames)
    position, field = layout.columns["image_id"]
    offsets: dict[str, int] = {}
    lines: dict[str, int] = {}
    with _open_binary(Path(path)) as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                parts = line.rstrip(b"\r\n").split(b"\t", position + 1)
                where = f"{path} line {number}"
                if len(parts) <= position:
                    raise DataError(f"{where}, field {field!r}: missing (only {len(parts)} fields)")
                image_id = _image_id_text(parts[position], where, field)
                if image_id in offsets:
                    raise DataError(
                        f"{where}, field {field!r}: image_id {image_id} repeats "
                        f"line {lines[image_id]}"
                    )
                offsets[image_id] = offset
                lines[image_id] = number
            offset += len(line)
    return offsets


def read_at(
    path: str | Path, offset: int, fieldnames: Sequence[str] = DEFAULT_FIELDS
) -> RegionFeatures:
    """Reads the line starting at byte `offset` (from `index_tsv`).

    Raises:
        DataError: the offset is not the start of a non-blank line, or the line is malformed.
    """
    layout = _TsvLayout(fieldnames)
    where = f"{path} byte offset {offset}"
    with _open_binary(Path(path)) as handle:
        if offset < 0:
            raise DataError(f"{where}: negative offset")
        if offset > 0:
            handle.seek(offset - 1)
            if handle.read(1) != b"\n":
                raise DataError(f"{where}: not the start of a line")
        handle.seek(offset)
        line = handle.readline()
    if not line.strip():
        raise DataError(f"{where}: no record there (end of file or blank line)")
    return _parse_line(line, layout, where)


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataError(f"cannot read feature file {path}: {error.strerror or error}") from error


def _image_id_text(raw: bytes, where: str, field: str) -> str:
    try:
        image_id = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}, field {field!r}: not UTF-8 text") from None
    if not image_id:
        raise DataError(f"{where}, field {field!r}: empty image id")
    return image_id


def _parse_line(line: bytes, layout: _TsvLayout, where: str) -> RegionFeatures:
    """Parses one TSV line; `where` names file and line (or offset)."""
    parts = line.rstrip(b"\r\n").split(b"\t")
    if len(parts) != len(layout.names):
        raise DataError(
            f"{where}: expected {len(layout.names)} tab-separated fields {layout.names}, "
            f"got {len(parts)}"
        )
    position, field = layout.columns["image_id"]
    image_id = _image_id_text(parts[position], where, field)
    record = f"{where} image_id {image_id}"

    def text(role: str) -> str:
        position, name = layout.columns[role]
        try:
            return parts[position].decode("ascii")
        except UnicodeDecodeError:
            raise FieldError(name, "not ASCII text") from None

    try:
        width = positive_int(text("image_w").strip(), layout.name("image_w"), from_text=True)
        height = positive_int(text("image_h").strip(), layout.name("image_h"), from_text=True)
        num_boxes = positive_int(text("num_boxes").strip(), layout.name("num_boxes"), from_text=True)
        boxes = _b64_rows(text("boxes"), layout.name("boxes"), num_boxes, columns=4)
        features = _b64_rows(text("features"), layout.name("features"), num_boxes)
        class_scores = image_box_feature = None
        if "class_scores" in layout.columns:
            name = layout.name("class_scores")
            class_scores = _b64_rows(text("class_scores"), name, num_boxes)
        if "image_box_feature" in layout.columns:
            name = layout.name("image_box_feature")
            image_box_feature = _b64_vector(text("image_box_feature"), name, features.shape[1])
        return _checked(
            record, image_id, width, height, boxes, features, class_scores, image_box_feature,
            names={role: name for role, (_, name) in layout.columns.items()},
        )
    except FieldError as error:
        raise record_error(record, error) from None


# ---------------------------------------------------------------------------------------------
# npz


def read_npz(path: str | Path) -> RegionFeatures:
    """Reads one image's `.npz` (see the module docstring for its keys).

    Raises:
        DataError: the file cannot be read, is not an npz archive, or a key is missing or bad.
    """
    name = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as error:
        raise DataError(f"cannot read npz file {name}: {error.strerror or error}") from error
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{name}: not an npz archive of numeric arrays ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{name}: a single .npy array, expected an .npz archive of named arrays")
    with archive:
        try:
            return _from_npz(archive, name, Path(path).stem)
        except FieldError as error:
            raise record_error(name, error) from None


def _from_npz(archive: Any, name: str, stem: str) -> RegionFeatures:
    keys = set(archive.files)

    def first(*candidates: str, required: bool = True) -> Optional[str]:
        for key in candidates:
            if key in keys:
                return key
        if required:
            raise FieldError(candidates[0], f"missing (also looked for {list(candidates[1:])})")
        return None

    def load(key: str) -> np.ndarray:
        try:
            return np.asarray(archive[key])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise FieldError(key, f"cannot be read ({error})") from None

    boxes_key = first("boxes", "bbox")
    boxes = _numeric(load(boxes_key), boxes_key, ndim=2)
    if boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise FieldError(boxes_key, f"expected shape [N >= 1, 4], got {list(boxes.shape)}")
    count = boxes.shape[0]
    features_key = first("features", "x")
    features = _numeric(load(features_key), features_key, ndim=2)
    if features_key == "x" and features.shape[0] != count and features.shape[1] == count:
        features = np.ascontiguousarray(features.T)  # stored [D, N]
    if features.shape[0] != count or features.shape[1] == 0:
        raise FieldError(
            features_key, f"shape {list(features.shape)} does not hold {count} boxes' features"
        )
    width_key = first("image_w", "image_width")
    height_key = first("image_h", "image_height")
    width = positive_int(_scalar(load(width_key), width_key), width_key, from_text=True)
    height = positive_int(_scalar(load(height_key), height_key), height_key, from_text=True)
    count_key = first("num_boxes", "num_bbox", required=False)
    if count_key is not None:
        num_boxes = positive_int(_scalar(load(count_key), count_key), count_key, from_text=True)
        if num_boxes != count:
            raise FieldError(count_key, f"is {num_boxes} but {boxes_key} holds {count} boxes")
    image_id = stem
    if "image_id" in keys:
        image_id = _id_value(_scalar(load("image_id"), "image_id"))
    class_scores = image_box_feature = None
    scores_key = first("cls_prob", "classes", required=False)
    if scores_key is not None:
        class_scores = _numeric(load(scores_key), scores_key, ndim=2)
    if "image_box_feature" in keys:
        image_box_feature = _numeric(load("image_box_feature"), "image_box_feature", ndim=1)
    return _checked(
        name, image_id, width, height, boxes, features, class_scores, image_box_feature,
        names={"boxes": boxes_key, "features": features_key, "class_scores": scores_key or ""},
    )


def _numeric(array: np.ndarray, field: str, ndim: int) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise FieldError(field, f"expected a numeric array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise FieldError(field, f"expected {ndim} dimensions, got shape {list(array.shape)}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(array, dtype=np.float32)


def _scalar(array: np.ndarray, field: str) -> Any:
    if array.size != 1:
        raise FieldError(field, f"expected a single value, got shape {list(array.shape)}")
    value = array.reshape(()).item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------
# VL-BERT json


def read_feature_json(path: str | Path) -> RegionFeatures:
    """Reads one VL-BERT precomputed `<image_id>.json` (see the module docstring for its keys).

    Raises:
        DataError: the file cannot be read, is not a JSON object, or a field is missing or bad.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read feature file {name}: {error.strerror or error}") from error
    content = parse_json_object(data, name)
    try:
        image_id = _id_value(content.get("image_id", Path(path).stem))
        width = positive_int(get_field(content, "image_w"), "image_w", from_text=True)
        height = positive_int(get_field(content, "image_h"), "image_h", from_text=True)
        num_boxes = positive_int(get_field(content, "num_boxes"), "num_boxes", from_text=True)
        boxes = _b64_rows(get_field(content, "boxes"), "boxes", num_boxes, columns=4)
        features = _b64_rows(get_field(content, "features"), "features", num_boxes)
        class_scores = image_box_feature = None
        if content.get("classes") is not None:
            class_scores = _b64_rows(content["classes"], "classes", num_boxes)
        if content.get("image_box_feature") is not None:
            image_box_feature = _b64_vector(
                content["image_box_feature"], "image_box_feature", features.shape[1]
            )
        return _checked(
            name, image_id, width, height, boxes, features, class_scores, image_box_feature,
            names={"class_scores": "classes"},
        )
    except FieldError as error:
        raise record_error(name, error) from None


# ---------------------------------------------------------------------------------------------
# Shared decoding and validation


def _id_value(value: Any) -> str:
    """An image id from an int or a non-empty string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FieldError("image_id", f"expected an integer or a string, got {value!r}")
    text = str(value).strip()
    if not text:
        raise FieldError("image_id", "empty image id")
    return text


def _b64_floats(value: Any, field: str) -> np.ndarray:
    """Decodes base64 float32 data into a flat, writable array."""
    if not isinstance(value, str):
        raise FieldError(field, f"expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        text = text[2:-1]  # Python 3 `str(bytes)` written by some ports of generate_tsv.py
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise FieldError(field, f"not valid base64 ({error})") from None
    if len(raw) % _FLOAT_BYTES:
        raise FieldError(
            field, f"base64 decodes to {len(raw)} bytes, not a multiple of {_FLOAT_BYTES} (float32)"
        )
    return np.frombuffer(raw, dtype=np.float32).copy()


def _b64_rows(value: Any, field: str, rows: int, columns: Optional[int] = None) -> np.ndarray:
    """Decodes base64 float32 data into [rows, columns]; columns is inferred when None."""
    flat = _b64_floats(value, field)
    if columns is None:
        if flat.size == 0 or flat.size % rows:
            raise FieldError(
                field,
                f"holds {flat.size} float32 values, not a non-zero multiple of num_boxes = {rows}",
            )
        columns = flat.size // rows
    elif flat.size != rows * columns:
        raise FieldError(
            field,
            f"holds {flat.size} float32 values ({flat.size / columns:g} rows of {columns}) "
            f"but num_boxes is {rows}",
        )
    return flat.reshape(rows, columns)


def _b64_vector(value: Any, field: str, length: int) -> np.ndarray:
    flat = _b64_floats(value, field)
    if flat.size != length:
        raise FieldError(field, f"holds {flat.size} float32 values, expected D = {length}")
    return flat


def _checked(
    record: str,
    image_id: str,
    width: int,
    height: int,
    boxes: np.ndarray,
    features: np.ndarray,
    class_scores: Optional[np.ndarray],
    image_box_feature: Optional[np.ndarray],
    names: dict[str, str],
) -> RegionFeatures:
    """Checks shapes, finiteness and box geometry; `names` maps roles to the file's field names."""
    boxes_name = names.get("boxes", "boxes")
    features_name = names.get("features", "features")
    scores_name = names.get("class_scores") or "class_scores"
    count = boxes.shape[0]
    if class_scores is not None and (class_scores.shape[0] != count or class_scores.shape[1] == 0):
        raise FieldError(
            scores_name, f"shape {list(class_scores.shape)} does not hold {count} boxes' scores"
        )
    if image_box_feature is not None and image_box_feature.shape != (features.shape[1],):
        raise FieldError(
            "image_box_feature",
            f"shape {list(image_box_feature.shape)}, expected [{features.shape[1]}] like features",
        )
    _check_finite(boxes, boxes_name)
    _check_finite(features, features_name)
    if class_scores is not None:
        _check_finite(class_scores, scores_name)
    if image_box_feature is not None:
        _check_finite(image_box_feature[None], "image_box_feature")
    _check_boxes(boxes, width, height, boxes_name)
    return RegionFeatures(
        record=record,
        image_id=image_id,
        image_width=width,
        image_height=height,
        boxes=boxes,
        features=features,
        class_scores=class_scores,
        image_box_feature=image_box_feature,
    )


def _check_finite(array: np.ndarray, field: str) -> None:
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.nonzero(~finite)[0][0])
        raise FieldError(field, f"row {row} holds NaN or infinite values")


def _check_boxes(boxes: np.ndarray, width: int, height: int, field: str) -> None:
    """x2 >= x1, y2 >= y1, and within the image up to 1 px."""
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        row = int(np.nonzero(inverted)[0][0])
        raise FieldError(field, f"box {row} {boxes[row].tolist()} has x2 < x1 or y2 < y1")
    low = -_BOX_TOLERANCE_PX
    right = min(width, _HUGE_PX) + _BOX_TOLERANCE_PX  # min(): ints beyond float range
    bottom = min(height, _HUGE_PX) + _BOX_TOLERANCE_PX
    outside = (
        (boxes[:, 0] < low) | (boxes[:, 1] < low) | (boxes[:, 2] > right) | (boxes[:, 3] > bottom)
    )
    if outside.any():
        row = int(np.nonzero(outside)[0][0])
        raise FieldError(
            field,
            f"box {row} {boxes[row].tolist()} lies outside the {width} x {height} image "
            f"by more than {_BOX_TOLERANCE_PX:g} px",
        )
