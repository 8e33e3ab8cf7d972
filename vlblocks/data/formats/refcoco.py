"""RefCOCO, RefCOCO+ and RefCOCOg: `refs(unc).p` / `refs(umd).p` with the COCO `instances.json`.

`refs(*).p` is a Python 2 pickle of a list of refs::

    {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "category_id": 1,
     "split": "train" | "val" | "testA" | "testB" | "test",
     "file_name": "COCO_train2014_000000581857_16.jpg", "sent_ids": [0, 1, 2],
     "sentences": [{"tokens": ["the", "lady", ...], "raw": "THE LADY ...",
                    "sent_id": 0, "sent": "the lady ..."}, ...]}

It is loaded with `safe_load_pickle` (no code runs) or, after `convert_refs_to_json`, from JSON.
`instances.json` is COCO's instances format; `bbox` is [x, y, w, h] in pixels. The referred box
comes from it; the image's ground-truth boxes come from it too, or from a second COCO instances
file (VL-BERT reads those from COCO's `annotations/instances_train2014.json`).

Detected proposals (MAttNet's `res101_coco_minus_refer_notime_dets.json`) are a JSON list of
`{"det_id", "image_id", "category_id", "score", "box": [x, y, w, h]}`.

Boxes are returned as x1, y1, x2, y2 with x2 = x + w and y2 = y + h (no -1), as VL-BERT builds
them; `iou_plus_one` then measures widths as x2 - x1 + 1, like VL-BERT's RefCOCO evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vlblocks.data.errors import DataError
from vlblocks.data.formats.records import (
    FieldError,
    SkippingReader,
    finite_number,
    index_by_id,
    integer_field,
    is_int,
    load_json,
    record_error,
    record_index,
    show,
)
from vlblocks.data.formats.safe_pickle import convert_refs_to_json, safe_load_pickle

__all__ = [
    "SPLITS",
    "ReferringExpression",
    "RefCocoReader",
    "convert_refs_to_json",
    "iou_plus_one",
    "refcoco_labels",
]

SPLITS = ("train", "val", "test", "testA", "testB")
POSITIVE_IOU = 0.5
# Box coordinates beyond this are malformed.
_MAX_COORDINATE = 1e30


@dataclass(frozen=True)
class ReferringExpression:
    """One sentence referring to one COCO object.

    Attributes:
        record: where it came from: "<refs file> ref_id 3 sent_id 7".
        ref_id, sent_id, image_id, split, category_id: as in the refs file.
        tokens: the sentence's tokens as stored (lower-case words).
        sentence: the sentence's `sent` text.
        target_box: [4] float32 x1, y1, x2, y2 of the referred annotation (x2 = x + w).
        candidate_boxes: [N, 4] float32 x1, y1, x2, y2: `annotation_boxes`, or the image's
            detected proposals when a proposals file was given (in file order).
        ann_id: the referred COCO annotation id.
        candidate_ids: [N] annotation ids, or `det_id`s for proposals.
        image_file_name: the image's `file_name` in `instances.json`, or None when absent.
        annotation_boxes: [M, 4] float32 x1, y1, x2, y2 of every annotation of the image in the
            annotations file, in file order (what pycocotools' `getAnnIds(imgIds=...)` lists).
        annotation_ids: [M] their annotation ids.
    """

    record: str
    ref_id: int
    sent_id: int
    image_id: int
    split: str
    tokens: list[str]
    sentence: str
    target_box: np.ndarray
    candidate_boxes: np.ndarray
    category_id: int
    ann_id: int
    candidate_ids: list[int]
    image_file_name: Optional[str]
    annotation_boxes: np.ndarray
    annotation_ids: list[int]


def iou_plus_one(box_a: Any, box_b: Any) -> np.ndarray:
    """IoU of x1, y1, x2, y2 boxes with inclusive pixel ends (w = x2 - x1 + 1), broadcasting.

    Args:
        box_a, box_b: [..., 4] arrays (e.g. [N, 4] candidates against one [4] target).

    Returns:
        [...] float64 IoU; 0 where the union is empty.
    """
    a = np.asarray(box_a, dtype=np.float64)
    b = np.asarray(box_b, dtype=np.float64)
    inter_w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    inter_h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def refcoco_labels(candidates: Any, target: Any) -> np.ndarray:
    """[N] bool: which candidate boxes have `iou_plus_one` > 0.5 with the target box."""
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 4)
    return iou_plus_one(candidates, np.asarray(target, dtype=np.float64)) > POSITIVE_IOU


class RefCocoReader(SkippingReader[ReferringExpression]):
    """Random-access reader yielding one `ReferringExpression` per sentence.

    Refs, annotations and proposals are indexed when the reader is built; each ref is validated
    when one of its sentences is accessed.

    Args:
        refs_file: `refs(unc).p` / `refs(umd).p`, or its JSON conversion (a `.json` suffix
            selects JSON, anything else the pickle).
        instances_file: the dataset's COCO `instances.json`.
        split: keep only refs of this split (one of `SPLITS`); None keeps all. Refs whose split
            is not a valid split name are kept, and raise on access.
        proposals_file: detected boxes to use as candidates instead of the ground truth.
        annotations_file: COCO instances file whose annotations are each image's ground-truth
            boxes (VL-BERT: COCO's `annotations/instances_train2014.json`); None reads them from
            `instances_file`.
        skip_bad_records: when iterating, skip malformed sentences and append their messages to
            `skipped` instead of raising. Indexing always raises.

    Raises:
        ValueError: `split` is not a known split name.
        DataError: a file cannot be read or is not the expected list / object, or an annotation
            or proposal lacks an integer id or image_id; on access, a ref is malformed (message
            names the file, ref_id / sent_id and field).
    """

    def __init__(
        self,
        refs_file: str | Path,
        instances_file: str | Path,
        split: Optional[str] = None,
        proposals_file: Optional[Path] = None,
        skip_bad_records: bool = False,
        annotations_file: Optional[str | Path] = None,
    ) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"split {show(split)} is not one of {SPLITS}")
        self.refs_file = Path(refs_file)
        self.instances_file = Path(instances_file)
        self.proposals_file = None if proposals_file is None else Path(proposals_file)
        self.split = split
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self._name = str(refs_file)
        self._refs = _load_refs(self.refs_file)
        instances = load_json(self.instances_file)
        self._annotations, self._image_annotations = _index_annotations(
            instances, self.instances_file
        )
        self._image_names = _index_image_names(instances, self.instances_file)
        self.annotations_file = self.instances_file if annotations_file is None else Path(annotations_file)
        self._gt_annotations, self._gt_image_annotations = self._annotations, self._image_annotations
        if annotations_file is not None:
            self._gt_annotations, self._gt_image_annotations = _index_annotations(
                load_json(self.annotations_file), self.annotations_file
            )
        self._proposals: Optional[dict[int, list[dict[str, Any]]]] = None
        if self.proposals_file is not None:
            self._proposals = _index_proposals(load_json(self.proposals_file), self.proposals_file)
        self._entries = self._index_sentences()

    def _index_sentences(self) -> list[tuple[int, Optional[int]]]:
        """(ref index, sentence index) per sentence; (ref index, None) for a ref without any."""
        entries: list[tuple[int, Optional[int]]] = []
        for position, ref in enumerate(self._refs):
            ref_split = ref.get("split") if isinstance(ref, dict) else None
            if self.split is not None and ref_split in SPLITS and ref_split != self.split:
                continue
            sentences = ref.get("sentences") if isinstance(ref, dict) else None
            if isinstance(sentences, list) and sentences:
                entries.extend((position, number) for number in range(len(sentences)))
            else:
                entries.append((position, None))
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> ReferringExpression:
        position, number = self._entries[
            record_index(index, len(self), f"sentences in {self._name}")
        ]
        ref = self._refs[position]
        where = _describe(self._name, position, ref, number)
        try:
            return self._parse(ref, number, where)
        except FieldError as error:
            raise record_error(where, error) from None

    def _parse(self, ref: Any, number: Optional[int], where: str) -> ReferringExpression:
        if not isinstance(ref, dict):
            raise FieldError(None, f"expected a dict, got {type(ref).__name__}")
        ref_id = integer_field(ref, "ref_id")
        ann_id = integer_field(ref, "ann_id")
        image_id = integer_field(ref, "image_id")
        category_id = integer_field(ref, "category_id")
        split = ref.get("split")
        if split not in SPLITS:
            raise FieldError("split", f"unknown split {show(split)}, expected one of {SPLITS}")
        if number is None:
            sentences = show(ref.get("sentences"))
            raise FieldError("sentences", f"expected a non-empty list, got {sentences}")
        sentence = ref["sentences"][number]
        if not isinstance(sentence, dict):
            raise FieldError("sentences", f"sentence {number} is not a dict")
        sent_id = integer_field(sentence, "sent_id")
        tokens = sentence.get("tokens")
        if not isinstance(tokens, list) or not tokens or any(not isinstance(t, str) for t in tokens):
            raise FieldError("tokens", f"expected non-empty list of strings, got {show(tokens)}")
        text = sentence.get("sent")
        if not isinstance(text, str):
            raise FieldError("sent", f"expected a string, got {show(text)}")
        annotation = self._annotations.get(ann_id)
        if annotation is None:
            raise FieldError("ann_id", f"annotation {ann_id} is not in {self.instances_file}")
        if annotation["image_id"] != image_id:
            raise FieldError(
                "image_id",
                f"is {image_id} but annotation {ann_id} belongs to image {annotation['image_id']}",
            )
        target = _xywh_to_xyxy(annotation.get("bbox"), f"{self.instances_file} annotation {ann_id}")
        annotation_ids, annotation_boxes = self._ground_truth_boxes(image_id)
        candidate_ids, candidates = annotation_ids, annotation_boxes
        if self._proposals is not None:
            candidate_ids, candidates = self._proposal_boxes(image_id)
        return ReferringExpression(
            record=where,
            ref_id=ref_id,
            sent_id=sent_id,
            image_id=image_id,
            split=split,
            tokens=list(tokens),
            sentence=text,
            target_box=target,
            candidate_boxes=candidates,
            category_id=category_id,
            ann_id=ann_id,
            candidate_ids=candidate_ids,
            image_file_name=self._image_names.get(image_id),
            annotation_boxes=annotation_boxes,
            annotation_ids=annotation_ids,
        )

    def _ground_truth_boxes(self, image_id: int) -> tuple[list[int], np.ndarray]:
        """The image's annotation ids [M] and boxes [M, 4] in annotations-file order."""
        ids = self._gt_image_annotations.get(image_id, [])
        source = f"{self.annotations_file} annotation"
        boxes = [_xywh_to_xyxy(self._gt_annotations[i].get("bbox"), f"{source} {i}") for i in ids]
        return list(ids), np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 4)

    def _proposal_boxes(self, image_id: int) -> tuple[list[int], np.ndarray]:
        """The image's proposal det_ids [N] and boxes [N, 4] in proposals-file order."""
        proposals = self._proposals.get(image_id, []) if self._proposals is not None else []
        source = f"{self.proposals_file} det_id"
        boxes = [_xywh_to_xyxy(p.get("box"), f"{source} {p['det_id']}", "box") for p in proposals]
        ids = [p["det_id"] for p in proposals]
        return ids, np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 4)


def _describe(name: str, position: int, ref: Any, number: Optional[int]) -> str:
    """'<file> ref_id R sent_id S', falling back to positions where the ids are unusable."""
    ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
    where = f"{name} ref_id {ref_id}" if is_int(ref_id) else f"{name} ref #{position}"
    if number is not None:
        sentence = ref["sentences"][number]
        sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
        where += f" sent_id {sent_id}" if is_int(sent_id) else f" sentence #{number}"
    return where


def _load_refs(path: Path) -> list[Any]:
    refs = load_json(path) if path.suffix.lower() == ".json" else safe_load_pickle(path)
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _index_annotations(
    instances: Any, path: Path
) -> tuple[dict[int, dict[str, Any]], dict[int, list[int]]]:
    """Annotation id -> annotation, and image id -> its annotation ids in file order."""
    annotations = instances.get("annotations") if isinstance(instances, dict) else None
    if not isinstance(annotations, list):
        raise DataError(f"{path}, field 'annotations': expected a list in a JSON object")
    by_id = index_by_id(annotations, f"{path} annotations", ("id", "image_id"))
    by_image: dict[int, list[int]] = defaultdict(list)
    for annotation_id, annotation in by_id.items():
        by_image[annotation["image_id"]].append(annotation_id)
    return by_id, dict(by_image)


def _index_image_names(instances: dict[str, Any], path: Path) -> dict[int, str]:
    """Image id -> file_name, for the `images` entries that have both."""
    images = instances.get("images", [])
    if not isinstance(images, list):
        raise DataError(f"{path}, field 'images': expected a list")
    return {
        image["id"]: image["file_name"]
        for image in images
        if isinstance(image, dict)
        and is_int(image.get("id"))
        and isinstance(image.get("file_name"), str)
    }


def _index_proposals(proposals: Any, path: Path) -> dict[int, list[dict[str, Any]]]:
    """Image id -> its proposals in file order (boxes are checked when used)."""
    if not isinstance(proposals, list):
        raise DataError(f"{path}: expected a list of detections, got {type(proposals).__name__}")
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for position, proposal in enumerate(proposals):
        for key in ("det_id", "image_id"):
            if not isinstance(proposal, dict) or not is_int(proposal.get(key)):
                raise DataError(f"{path} detection #{position}, field {key!r}: expected an integer")
        by_image[proposal["image_id"]].append(proposal)
    return dict(by_image)


def _xywh_to_xyxy(bbox: Any, source: str, key: str = "bbox") -> np.ndarray:
    """[x, y, w, h] -> float32 [x1, y1, x2, y2] with x2 = x + w, y2 = y + h."""
    values = bbox if isinstance(bbox, list) else []
    numbers = [finite_number(v, _MAX_COORDINATE) for v in values]
    if len(numbers) != 4 or any(n is None for n in numbers):
        raise FieldError(
            key, f"{source}: expected [x, y, w, h] of finite numbers, got {show(bbox)}"
        )
    x, y, w, h = numbers
    if w < 0 or h < 0:  # type: ignore[operator]
        raise FieldError(key, f"{source}: negative width or height in {show(bbox)}")
    return np.asarray([x, y, x + w, y + h], dtype=np.float32)  # type: ignore[operator]
