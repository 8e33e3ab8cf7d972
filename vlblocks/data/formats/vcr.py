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
from PIL import Image, ImageDraw

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
# Polygons are drawn on a canvas this many times finer than the mask grid (odd, so each cell has
# a canvas pixel at its exact centre) and sampled at the cell centres.
_SUPERSAMPLE = 15
_COORDINATE_LIMIT = 1 << 24
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
    """

    boxes: np.ndarray
    scores: np.ndarray
    polygons: list[list[np.ndarray]]
    width: int
    height: int
    names: list[str] = field(default_factory=list)


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


def object_words(objects: Sequence[str], names: Sequence[str] = GENDER_NEUTRAL_NAMES) -> list[str]:
    """The text standing for each object: the k-th person of the image (counting from 0 in
    `objects` order) gets names[k % len(names)], any other object its class name."""
    if not names:
        raise ValueError("at least one person name is needed")
    replaced = []
    people = 0
    for name in objects:
        if name == "person":
            replaced.append(names[people % len(names)])
            people += 1
        else:
            replaced.append(name)
    return replaced


def ground_tokens(
    tokens: Any, objects: Sequence[str], person_names: Sequence[str] = GENDER_NEUTRAL_NAMES
) -> GroundedText:
    """Converts a VCR mixed token list into words and per-word regions.

    Plain tokens become lower-cased basic-tokenised words with region 0. A reference `[i, j, ...]`
    becomes the words of object i, then "and" (region 0), then the words of object j, and so on;
    a person is replaced by a gender-neutral name (see `object_words`), other objects by their
    class name, and their words get region i + 1 (region 0 is the whole image).

    Raises:
        DataError: `tokens` is not a list of str and non-empty lists of in-range indices.
    """
    if not isinstance(tokens, list):
        raise DataError(f"expected a list of tokens, got {type(tokens).__name__}")
    replacement = object_words(objects, person_names)
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
    """Rasterises one box's instance mask on a size x size grid laid over the box.

    Like the official VCR pipeline (R2C's `make_mask`, used by VL-BERT), a cell is set when its
    centre lies inside any of the polygons. The polygons are drawn with Pillow's
    `ImageDraw.polygon` on a canvas 15 times finer than the grid, with vertices rounded to
    canvas pixels, and sampled at the cell centres, so a cell centre within 1/30 of a cell of an
    edge may differ from exact point-in-polygon. Polygons with fewer than 3 points set nothing;
    a box with zero width or height gives an empty mask.

    Args:
        polygons: the box's polygons, each a sequence of (x, y) image-pixel points.
        box: x1, y1, x2, y2 (further entries such as a score are ignored).
        size: grid cells per side.

    Returns:
        [size, size] float32 of 0.0 / 1.0, rows along y.
    """
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    mask = np.zeros((size, size), dtype=np.float32)
    if not x2 > x1 or not y2 > y1:
        return mask
    canvas_size = size * _SUPERSAMPLE
    scale_x = canvas_size / (x2 - x1)
    scale_y = canvas_size / (y2 - y1)
    canvas = Image.new("1", (canvas_size, canvas_size), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        # Canvas pixel i has its centre at integer i: shift by half a pixel, then round.
        xs = np.rint((points[:, 0] - x1) * scale_x - 0.5)
        ys = np.rint((points[:, 1] - y1) * scale_y - 0.5)
        xs = np.clip(xs, -_COORDINATE_LIMIT, _COORDINATE_LIMIT).astype(np.int64)
        ys = np.clip(ys, -_COORDINATE_LIMIT, _COORDINATE_LIMIT).astype(np.int64)
        draw.polygon([(int(x), int(y)) for x, y in zip(xs, ys)], fill=1)
    centres = np.arange(size) * _SUPERSAMPLE + _SUPERSAMPLE // 2
    pixels = np.asarray(canvas, dtype=bool)
    mask[:] = pixels[np.ix_(centres, centres)]
    return mask


def instance_masks(metadata: VCRMetadata, size: int = MASK_SIZE) -> np.ndarray:
    """[N, size, size] float32 masks of all boxes of an image (see `polygon_masks`)."""
    masks = np.zeros((len(metadata.boxes), size, size), dtype=np.float32)
    for index, (box, polygons) in enumerate(zip(metadata.boxes, metadata.polygons)):
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

    Raises:
        DataError: the annotation file cannot be read; or, on access, a line is malformed (the
            message names the file, line, annot_id and field).
    """

    def __init__(
        self, annotation_file: str | Path, images_root: str | Path, skip_bad_records: bool = False
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.images_root = Path(images_root)
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self._name = str(annotation_file)
        self._starts, self._ends, self._line_numbers = index_lines(
            self.annotation_file, self._name
        )

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> VCRItem:
        index = record_index(index, len(self), f"records in {self._name}")
        with open(self.annotation_file, "rb") as handle:
            handle.seek(self._starts[index])
            line = handle.read(self._ends[index] - self._starts[index])
        where = f"{self._name} line {self._line_numbers[index]}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise DataError(f"{where}: not valid JSON ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("annot_id"), str):
            where = f"{where} (annot_id {show(record['annot_id'])})"
        try:
            return self._parse(record, where)
        except FieldError as error:
            raise record_error(where, error) from None

    def _parse(self, record: Any, where: str) -> VCRItem:
        if not isinstance(record, dict):
            raise FieldError(None, f"expected a JSON object, got {type(record).__name__}")
        objects = record.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) and o for o in objects):
            raise FieldError("objects", f"expected a list of class names, got {show(objects)}")
        question = _grounded(get_field(record, "question"), "question", objects)
        answers = _choices(record, "answer_choices", objects)
        rationales = _choices(record, "rationale_choices", objects)
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


def _grounded(
    tokens: Any, key: str, objects: list[str], choice: Optional[int] = None
) -> GroundedText:
    where = "" if choice is None else f"choice {choice}: "
    if not isinstance(tokens, list) or not tokens:
        raise FieldError(key, f"{where}expected a non-empty token list, got {show(tokens)}")
    try:
        return ground_tokens(tokens, objects)
    except DataError as error:
        raise FieldError(key, f"{where}{error}") from None


def _choices(record: dict[str, Any], key: str, objects: list[str]) -> list[GroundedText]:
    choices = get_field(record, key)
    if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
        count = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise FieldError(key, f"expected a list of exactly {NUM_CHOICES} choices, got {count}")
    return [_grounded(tokens, key, objects, choice) for choice, tokens in enumerate(choices)]


def _label(record: dict[str, Any], key: str) -> Optional[int]:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NUM_CHOICES:
        raise FieldError(key, f"expected an integer in 0..{NUM_CHOICES - 1}, got {show(value)}")
    return value
