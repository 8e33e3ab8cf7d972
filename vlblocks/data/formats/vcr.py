"""VCR (Visual Commonsense Reasoning): `{train,val,test}.jsonl` plus `vcr1images/`.

Each jsonl line is one question::

    {"annot_id": "train-0", "movie": "...", "objects": ["person", "person", "car"],
     "img_fn": "lsmdc_.../xxx.jpg", "metadata_fn": "lsmdc_.../xxx.json",
     "question": ["What", "is", [0], "doing", "?"],
     "answer_choices": [4 mixed token lists], "answer_label": 2,        (label absent in test)
     "rationale_choices": [4 mixed token lists], "rationale_label": 0,  (label absent in test)
     ...}

In a *mixed token list* a plain token is a str and a reference to detections is a list of
indices into `objects` (and into the metadata boxes). `ground_tokens` turns one into words with
region tags (region 0 = the whole image, region i + 1 = detection i), as VL-BERT does.

Each image has a metadata JSON next to it::

    {"boxes": [[x1, y1, x2, y2, score], ...], "segms": [[polygon, ...] per box],
     "names": [...], "width": 1920, "height": 800}

where a polygon is a list of [x, y] points in image pixels.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.records import (
    FieldError,
    SkippingReader,
    basic_tokenize,
    finite_number,
    get_field,
    index_lines,
    parse_json_object,
    positive_int,
    record_error,
    record_index,
    show,
)

# VL-BERT's list (R2C's has 15 entries, with "Peyton" twice and "Skyler").
GENDER_NEUTRAL_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton",
    "Kerry", "Jody", "Kendall", "Frankie", "Pat", "Quinn",
)  # fmt: skip
NUM_CHOICES = 4
MASK_SIZE = 14
NAME_COUNTERS = ("dataset", "image")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class GroundedText:
    """Words with the region each one refers to.

    Attributes:
        words: lower-cased basic-tokenised words.
        word_region: per word, 0 for plain words (and the "and" joining references) or
            detection index + 1 for words standing for a referenced detection.
    """

    words: list[str]
    word_region: list[int]


@dataclass(frozen=True)
class VCRMetadata:
    """The detections of one VCR image.

    Attributes:
        boxes: [N, 4] float32 x1, y1, x2, y2 in image pixels.
        scores: [N] float32 detector scores.
        polygons: per box, its list of polygons, each a [P, 2] float32 array of x, y points.
        width, height: image size in pixels.
        names: per box its class name (the same list as the annotation's `objects`).
        file_boxes: [N, 4] float64 x1, y1, x2, y2 as written in the file (the mask
            rasterisation computes with these, as the official code does); None: `boxes`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    polygons: list[list[np.ndarray]]
    width: int
    height: int
    names: list[str] = field(default_factory=list)
    file_boxes: Optional[np.ndarray] = None


@dataclass(frozen=True)
class VCRItem:
    """One VCR question with its answer and rationale choices, grounded to words.

    Attributes:
        record: where it came from: "<file> line <n> (annot_id 'train-0')".
        annot_id, movie, objects: as in the annotation.
        image_file, metadata_file: `images_root / img_fn` and `images_root / metadata_fn`
            (existence is checked only by `load_image` / `load_metadata`).
        question: the grounded question.
        answer_choices, rationale_choices: 4 grounded choices each.
        answer_label, rationale_label: index of the right choice, None in the test split.
    """

    record: str
    annot_id: str
    movie: str
    objects: list[str]
    image_file: Path
    metadata_file: Path
    question: GroundedText
    answer_choices: list[GroundedText]
    rationale_choices: list[GroundedText]
    answer_label: Optional[int]
    rationale_label: Optional[int]

    def load_image(self) -> Image.Image:
        """Reads and decodes the image as RGB (no EXIF rotation: boxes are in stored pixels).

        `images_root` may also address a zip folder, e.g. `vcr1images.zip@/vcr1images`.

        Raises:
            DataError: the image is missing or cannot be decoded (names record and `img_fn`).
        """
        try:
            data = zipped.read_bytes(str(self.image_file), Path.cwd())
        except DataError as error:
            raise DataError(f"{self.record}, field 'img_fn': {error}") from None
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(
                f"{self.record}, field 'img_fn': cannot decode {self.image_file} ({error})"
            ) from None

    def load_metadata(self) -> VCRMetadata:
        """Reads the detections; their number must equal the number of `objects`.

        Raises:
            DataError: the metadata file is missing or malformed (names record and `metadata_fn`).
        """
        try:
            data = zipped.read_bytes(str(self.metadata_file), Path.cwd())
            metadata = parse_vcr_metadata(data, str(self.metadata_file))
        except DataError as error:
            raise DataError(f"{self.record}, field 'metadata_fn': {error}") from None
        if len(metadata.boxes) != len(self.objects):
            raise DataError(
                f"{self.record}, field 'objects': {len(self.objects)} objects but "
                f"{len(metadata.boxes)} boxes in {self.metadata_file}"
            )
        return metadata


def object_words(objects: Sequence[str], names: Sequence[str] = GENDER_NEUTRAL_NAMES, first_person: int = 0) -> list[str]:
    """The text standing for each object: the k-th person of `objects` (counting from 0) gets
    names[(first_person + k) % len(names)], any other object its class name.

    `first_person` is the name counter on entry: the official VCR dataset keeps one counter that
    runs on from question to question (see `VCRReader`), so a question's first person is not
    always "Casey"."""
    if not names:
        raise ValueError("at least one person name is needed")
    replaced = []
    people = first_person
    for name in objects:
        if name == "person":
            replaced.append(names[people % len(names)])
            people += 1
        else:
            replaced.append(name)
    return replaced


def ground_tokens(
    tokens: Any, objects: Sequence[str], person_names: Sequence[str] = GENDER_NEUTRAL_NAMES, first_person: int = 0
) -> GroundedText:
    """Converts a VCR mixed token list into words and per-word regions.

    Plain tokens become lower-cased basic-tokenised words with region 0. A reference `[i, j, ...]`
    becomes the words of object i, then "and" (region 0), then the words of object j, and so on;
    a person is replaced by a gender-neutral name (see `object_words`), other objects by their
    class name, and their words get region i + 1 (region 0 is the whole image). `first_person`:
    the person-name counter on entry (see `object_words`).

    Raises:
        DataError: `tokens` is not a list of str and non-empty lists of in-range indices.
    """
    if not isinstance(tokens, list):
        raise DataError(f"expected a list of tokens, got {type(tokens).__name__}")
    replacement = object_words(objects, person_names, first_person)
    words: list[str] = []
    regions: list[int] = []
    for position, token in enumerate(tokens):
        if isinstance(token, str):
            new = basic_tokenize(token)
            words.extend(new)
            regions.extend([0] * len(new))
            continue
        if not isinstance(token, list) or not token:
            raise DataError(
                f"token {position} is neither a string nor a non-empty list: {show(token)}"
            )
        for rank, index in enumerate(token):
            if not isinstance(index, int) or isinstance(index, bool):
                raise DataError(f"token {position} refers to {show(index)}, not a detection index")
            if not 0 <= index < len(objects):
                raise DataError(
                    f"token {position} refers to detection {index}, out of range for "
                    f"{len(objects)} objects"
                )
            if rank:
                words.append("and")
                regions.append(0)
            new = basic_tokenize(replacement[index])
            words.extend(new)
            regions.extend([index + 1] * len(new))
    return GroundedText(words=words, word_region=regions)


def read_vcr_metadata(path: str | Path) -> VCRMetadata:
    """Reads a VCR metadata JSON file (plain path or `archive.zip@/member`).

    Raises:
        DataError: the file is missing or malformed (the message names the file and the field).
    """
    data = zipped.read_bytes(str(path), Path.cwd())
    return parse_vcr_metadata(data, str(path))


def parse_vcr_metadata(data: bytes, name: str) -> VCRMetadata:
    """Parses the bytes of a metadata JSON; `name` is used in error messages."""
    document = parse_json_object(data, name)
    try:
        width = positive_int(document.get("width"), "width")
        height = positive_int(document.get("height"), "height")
    except FieldError as error:
        raise record_error(name, error) from None
    raw_boxes = document.get("boxes")
    raw_segms = document.get("segms")
    for key, value in (("boxes", raw_boxes), ("segms", raw_segms)):
        if not isinstance(value, list):
            raise DataError(f"{name}, field {key!r}: expected a list, got {type(value).__name__}")
    if len(raw_boxes) != len(raw_segms):
        raise DataError(
            f"{name}, field 'segms': {len(raw_segms)} entries for {len(raw_boxes)} boxes"
        )
    rows = [_box_row(row, position, name) for position, row in enumerate(raw_boxes)]
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), 5)
    polygons = [_polygons(segm, position, name) for position, segm in enumerate(raw_segms)]
    names = document.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{name}, field 'names': expected a list of strings")
    if names and len(names) != len(rows):
        raise DataError(f"{name}, field 'names': {len(names)} names for {len(rows)} boxes")
    return VCRMetadata(
        boxes=table[:, :4].astype(np.float32),
        scores=table[:, 4].astype(np.float32),
        polygons=polygons,
        width=width,
        height=height,
        names=list(names),
        file_boxes=table[:, :4].copy(),
    )


def _box_row(row: Any, position: int, name: str) -> list[float]:
    values = row if isinstance(row, list) else []
    numbers = [finite_number(v, _FLOAT32_MAX) for v in values]
    if len(numbers) != 5 or any(n is None for n in numbers):
        raise DataError(
            f"{name}, field 'boxes': box {position} is not [x1, y1, x2, y2, score] of finite "
            f"numbers: {show(row)}"
        )
    x1, y1, x2, y2, _ = numbers
    if x2 < x1 or y2 < y1:
        raise DataError(
            f"{name}, field 'boxes': box {position} {show(row)} has x2 < x1 or y2 < y1"
        )
    return numbers  # type: ignore[return-value]


def _polygons(segm: Any, position: int, name: str) -> list[np.ndarray]:
    if not isinstance(segm, list):
        raise DataError(f"{name}, field 'segms': entry {position} is not a list of polygons")
    polygons = []
    for number, polygon in enumerate(segm):
        points = polygon if isinstance(polygon, list) else None
        coordinates = [] if points is None else [
            [finite_number(c, _FLOAT32_MAX) for c in point] if isinstance(point, list) else [None]
            for point in points
        ]
        if points is None or any(len(p) != 2 or None in p for p in coordinates):
            raise DataError(
                f"{name}, field 'segms': entry {position} polygon {number} is not a list of "
                "[x, y] pairs of finite numbers"
            )
        polygons.append(np.asarray(coordinates, dtype=np.float32).reshape(len(coordinates), 2))
    return polygons


def polygon_masks(
    polygons: Sequence[Any], box: Sequence[float], size: int = MASK_SIZE
) -> np.ndarray:
    """Rasterises one box's instance mask on a size x size grid, as the official VCR code does
    (`common/utils/mask.py: generate_instance_mask`, with scikit-image's `draw.polygon` of 2019).

    The box spans size / (x2 - x1 + 1) cells per pixel across and size / (y2 - y1 + 1) down
    (inclusive pixel boxes). Each polygon, in float32, is moved to the box's corner, scaled
    by those ratios and clamped to [0, size - 1]; a cell (row r, column c) is set when the point
    (x = c, y = r) is inside a polygon by the even-odd crossing rule, with a vertex or edge on
    the lower side of the half-open test counting as inside and one on the upper side not (see
    `_inside_polygon`). Polygons with fewer than 3 points set nothing.

    Args:
        polygons: the box's polygons, each a sequence of (x, y) image-pixel points.
        box: x1, y1, x2, y2 (further entries such as a score are ignored), in float64 as read
            from the metadata file (the official code computes the ratios in double).
        size: grid cells per side.

    Returns:
        [size, size] float32 of 0.0 / 1.0, rows along y.
    """
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    mask = np.zeros((size, size), dtype=np.float32)
    # Ratios in double, the polygon arithmetic in float32 (the official tensors are float32).
    x_ratio = np.float32(size / (x2 - x1 + 1))
    y_ratio = np.float32(size / (y2 - y1 + 1))
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float64)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float32).reshape(-1, 2)
        if len(points) < 3:
            continue
        xs = np.clip((points[:, 0] - np.float32(x1)) * x_ratio, np.float32(0), np.float32(size - 1))
        ys = np.clip((points[:, 1] - np.float32(y1)) * y_ratio, np.float32(0), np.float32(size - 1))
        inside = _inside_polygon(xs.astype(np.float64), ys.astype(np.float64), columns, rows)
        mask[inside] = 1.0
    return mask


def _inside_polygon(xs: np.ndarray, ys: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd crossing test (W. R. Franklin's PNPOLY, as in scikit-image before 0.18) of the
    points (x, y) against the polygon with vertices (xs, ys).

    An edge from vertex j to vertex i counts when y is in the half-open range between the two
    vertices' y (the lower one included) and the point lies strictly left of the edge at y.

    Inputs: xs, ys [P] float64; x, y: float64 arrays of one shape. Returns: bool array of it.
    """
    inside = np.zeros(x.shape, dtype=bool)
    previous = len(xs) - 1
    for current in range(len(xs)):
        xi, yi, xj, yj = xs[current], ys[current], xs[previous], ys[previous]
        straddles = ((yi <= y) & (y < yj)) | ((yj <= y) & (y < yi))
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= straddles & (x < crossing)
        previous = current
    return inside


def instance_masks(metadata: VCRMetadata, size: int = MASK_SIZE) -> np.ndarray:
    """[N, size, size] float32 masks of all boxes of an image (see `polygon_masks`), computed
    from the boxes as written in the file."""
    boxes = metadata.file_boxes if metadata.file_boxes is not None else metadata.boxes
    masks = np.zeros((len(boxes), size, size), dtype=np.float32)
    for index, (box, polygons) in enumerate(zip(boxes, metadata.polygons)):
        masks[index] = polygon_masks(polygons, box, size)
    return masks


class VCRReader(SkippingReader[VCRItem]):
    """Random-access reader of a VCR `{split}.jsonl` file.

    Only the byte offset of each line is kept in memory; a line is parsed and validated when it
    is accessed. Images and metadata are read only by `VCRItem.load_image` / `load_metadata`.

    Args:
        annotation_file: `train.jsonl`, `val.jsonl` or `test.jsonl`.
        images_root: the `vcr1images` folder (`img_fn` and `metadata_fn` are relative to it).
        skip_bad_records: when iterating, skip malformed lines and append their messages to
            `skipped` instead of raising. Indexing always raises.
        name_counter: how people get their names (`GENDER_NEUTRAL_NAMES`, in turn).
            "dataset" (official): one counter runs through the file, so record i's first person
            gets the name after the last person of record i - 1 (the counter on entry is the
            number of "person" objects in records 0..i-1, mod 13). The official dataset keeps
            this counter in the dataset object and advances it in whatever order its loader
            workers read records; counting in file order is what it does with one worker and no
            shuffling, and keeps each record's names the same whatever the order, worker or
            epoch. "image": the counter restarts at every record (R2C's convention).

    Raises:
        DataError: the annotation file cannot be read; or, on access, a line is malformed (the
            message names the file, line, annot_id and field).
        ValueError: an unknown `name_counter`.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        images_root: str | Path,
        skip_bad_records: bool = False,
        name_counter: str = "dataset",
    ) -> None:
        if name_counter not in NAME_COUNTERS:
            raise ValueError(f"name_counter must be one of {NAME_COUNTERS}, got {name_counter!r}")
        self.annotation_file = Path(annotation_file)
        self.images_root = Path(images_root)
        self.skip_bad_records = skip_bad_records
        self.name_counter = name_counter
        self.skipped: list[str] = []
        self._name = str(annotation_file)
        self._starts, self._ends, self._line_numbers = index_lines(
            self.annotation_file, self._name
        )
        # Counted once here, before any DataLoader worker copies the reader.
        self._persons_before = self._count_persons() if name_counter == "dataset" else None

    def __len__(self) -> int:
        return len(self._starts)

    def persons_before(self, index: int) -> int:
        """The name counter on entry to record `index`: 0 with `name_counter="image"`, else the
        number of "person" objects in the records before it."""
        return 0 if self._persons_before is None else int(self._persons_before[index])

    def _count_persons(self) -> np.ndarray:
        """[len(self)] int64: "person" objects in the records before each (a line that is not
        a JSON object with a list of `objects` counts none; reading it raises later)."""
        counts = [0]
        with open(self.annotation_file, "rb") as handle:
            for line in handle:  # one pass, in order: the records are the non-blank lines
                if line.strip():
                    counts.append(sum(1 for name in _objects_field(line) if name == "person"))
        return np.cumsum(counts[: len(self)], dtype=np.int64)

    def _line(self, index: int) -> bytes:
        with open(self.annotation_file, "rb") as handle:
            handle.seek(self._starts[index])
            return handle.read(self._ends[index] - self._starts[index])

    def __getitem__(self, index: int) -> VCRItem:
        index = record_index(index, len(self), f"records in {self._name}")
        line = self._line(index)
        where = f"{self._name} line {self._line_numbers[index]}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise DataError(f"{where}: not valid JSON ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("annot_id"), str):
            where = f"{where} (annot_id {show(record['annot_id'])})"
        try:
            return self._parse(record, where, self.persons_before(index))
        except FieldError as error:
            raise record_error(where, error) from None

    def _parse(self, record: Any, where: str, first_person: int = 0) -> VCRItem:
        if not isinstance(record, dict):
            raise FieldError(None, f"expected a JSON object, got {type(record).__name__}")
        objects = record.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) and o for o in objects):
            raise FieldError("objects", f"expected a list of class names, got {show(objects)}")
        question = _grounded(get_field(record, "question"), "question", objects, first_person=first_person)
        answers = _choices(record, "answer_choices", objects, first_person)
        rationales = _choices(record, "rationale_choices", objects, first_person)
        return VCRItem(
            record=where,
            annot_id=_string(record, "annot_id"),
            movie=_string(record, "movie"),
            objects=list(objects),
            image_file=self.images_root / _string(record, "img_fn"),
            metadata_file=self.images_root / _string(record, "metadata_fn"),
            question=question,
            answer_choices=answers,
            rationale_choices=rationales,
            answer_label=_label(record, "answer_label"),
            rationale_label=_label(record, "rationale_label"),
        )


def _string(record: dict[str, Any], key: str) -> str:
    value = get_field(record, key)
    if not isinstance(value, str) or not value:
        raise FieldError(key, f"expected a non-empty string, got {show(value)}")
    return value


def _objects_field(line: bytes) -> list:
    """The `objects` list of a jsonl line, [] when the line is not an object with such a list."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return []
    objects = record.get("objects") if isinstance(record, dict) else None
    return objects if isinstance(objects, list) else []


def _grounded(
    tokens: Any, key: str, objects: list[str], choice: Optional[int] = None, first_person: int = 0
) -> GroundedText:
    where = "" if choice is None else f"choice {choice}: "
    if not isinstance(tokens, list) or not tokens:
        raise FieldError(key, f"{where}expected a non-empty token list, got {show(tokens)}")
    try:
        return ground_tokens(tokens, objects, first_person=first_person)
    except DataError as error:
        raise FieldError(key, f"{where}{error}") from None


def _choices(record: dict[str, Any], key: str, objects: list[str], first_person: int = 0) -> list[GroundedText]:
    choices = get_field(record, key)
    if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
        count = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise FieldError(key, f"expected a list of exactly {NUM_CHOICES} choices, got {count}")
    return [_grounded(tokens, key, objects, choice, first_person) for choice, tokens in enumerate(choices)]


def _label(record: dict[str, Any], key: str) -> Optional[int]:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NUM_CHOICES:
        raise FieldError(key, f"expected an integer in 0..{NUM_CHOICES - 1}, got {show(value)}")
    return value
