"""COCO Captions (`captions_train2014.json`, `captions_val2014.json`).

Format::

    {"info": ..., "licenses": ...,
     "images": [{"id": 57870, "file_name": "COCO_train2014_000000057870.jpg",
                 "width": 640, "height": 480, ...}, ...],
     "annotations": [{"id": 787980, "image_id": 57870, "caption": "A restaurant has ..."}, ...]}

One `CocoCaption` is yielded per annotation, in file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vlblocks.data.errors import DataError
from vlblocks.data.formats.records import (
    FieldError,
    SkippingReader,
    basic_tokenize,
    get_string,
    index_by_id,
    integer_field,
    is_int,
    load_json,
    positive_int,
    record_error,
    record_index,
    show,
)


@dataclass(frozen=True)
class CocoCaption:
    """One caption of one COCO image.

    Attributes:
        record: where it came from, e.g. "captions_val2014.json annotation id 37".
        caption_id: the annotation id.
        image_id: the COCO image id.
        caption: the caption text as stored.
        caption_tokens: basic-tokenised lower-case words (punctuation split off).
        image_file: `image_root / file_name`, or None when no image root was given.
        image_width, image_height: image size in pixels, from the `images` entry.
    """

    record: str
    caption_id: int
    image_id: int
    caption: str
    caption_tokens: list[str]
    image_file: Optional[Path]
    image_width: int
    image_height: int


class CocoCaptionsReader(SkippingReader[CocoCaption]):
    """Random-access reader of a COCO captions JSON file.

    The file is parsed once; each annotation is validated when it is accessed.

    Args:
        path: `captions_{split}2014.json`.
        image_root: folder holding the images (e.g. `train2014/`); None leaves `image_file` None.
        skip_bad_records: when iterating, skip malformed annotations and append their messages
            to `skipped` instead of raising. Indexing always raises.

    Raises:
        DataError: the file cannot be read or parsed, lacks the `images` / `annotations` lists,
            or has a malformed or duplicated image id; on access, an annotation is malformed
            (message names the file, the annotation id and the field).
    """

    def __init__(
        self,
        path: str | Path,
        image_root: Optional[Path] = None,
        skip_bad_records: bool = False,
    ) -> None:
        self.path = Path(path)
        self.image_root = None if image_root is None else Path(image_root)
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self._name = str(path)
        document = load_json(self.path)
        self._images = _index_images(document, self._name)
        self._annotations = _list_field(document, "annotations", self._name)

    def __len__(self) -> int:
        return len(self._annotations)

    def __getitem__(self, index: int) -> CocoCaption:
        index = record_index(index, len(self), f"captions in {self._name}")
        annotation = self._annotations[index]
        where = f"{self._name} annotation #{index}"
        if isinstance(annotation, dict) and is_int(annotation.get("id")):
            where = f"{self._name} annotation id {annotation['id']}"
        try:
            return self._parse(annotation, where)
        except FieldError as error:
            raise record_error(where, error) from None

    def _parse(self, annotation: Any, where: str) -> CocoCaption:
        if not isinstance(annotation, dict):
            raise FieldError(None, f"expected a JSON object, got {type(annotation).__name__}")
        caption_id = integer_field(annotation, "id")
        image_id = integer_field(annotation, "image_id")
        caption = get_string(annotation, "caption")
        try:
            tokens = basic_tokenize(caption)
        except DataError as error:
            raise FieldError("caption", str(error)) from None
        if not tokens:
            raise FieldError("caption", f"empty caption {show(caption)}")
        image = self._images.get(image_id)
        if image is None:
            raise FieldError("image_id", f"no image with id {image_id} in 'images'")
        file_name, width, height = _image_info(image, image_id)
        return CocoCaption(
            record=where,
            caption_id=caption_id,
            image_id=image_id,
            caption=caption,
            caption_tokens=tokens,
            image_file=None if self.image_root is None else self.image_root / file_name,
            image_width=width,
            image_height=height,
        )


def _list_field(document: Any, key: str, name: str) -> list[Any]:
    if not isinstance(document, dict):
        raise DataError(f"{name}: expected a JSON object, got {type(document).__name__}")
    value = document.get(key)
    if not isinstance(value, list):
        raise DataError(f"{name}, field {key!r}: expected a list, got {type(value).__name__}")
    return value


def _index_images(document: Any, name: str) -> dict[int, dict[str, Any]]:
    """Maps image id to its `images` entry (entries are checked here only for their id)."""
    return index_by_id(_list_field(document, "images", name), f"{name} images")


def _image_info(image: dict[str, Any], image_id: int) -> tuple[str, int, int]:
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise FieldError(
            "file_name", f"image {image_id}: expected a non-empty string, got {show(file_name)}"
        )
    sizes = []
    for key in ("width", "height"):
        try:
            sizes.append(positive_int(image.get(key), key))
        except FieldError as error:
            raise FieldError(key, f"image {image_id}: {error.message}") from None
    return file_name, sizes[0], sizes[1]
