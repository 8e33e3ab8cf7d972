"""RefCOCO / RefCOCO+ / RefCOCOg fine-tuning samples, as VL-BERT builds them.

Each sample is `[CLS] expression [SEP]` (segment A, every token sees the whole image) with the
regions: the whole image first, then the candidate boxes (ground-truth annotations or detected
proposals), then, when training on proposals, every ground-truth annotation of the image.
`region_labels` marks the regions whose box overlaps the referred object with IoU > 0.5.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlblocks.contracts import Tokenizer
from vlblocks.data.datasets.run_data import RunData, existing_file
from vlblocks.data.demo.scenes import DemoScenes, demo_transform
from vlblocks.data.demo.task_data import demo_description, write_demo_task
from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.refcoco import POSITIVE_IOU, RefCocoReader, ReferringExpression, iou_plus_one, refcoco_labels
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.flip import SWAPPED_WORDS, flip_boxes, flip_image
from vlblocks.data.pipeline.images import ImageTransform, scale_boxes
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

__all__ = ["RefCocoDataset", "box_accuracy", "refcoco_data", "region_boxes", "swapped_piece_ids"]

BOX_SOURCES = ("gt", "detected")


def swapped_piece_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """WordPiece id of "left" -> id of "right" and back, for a vocabulary holding both as
    whole pieces; {} otherwise (then no piece can read "left" or "right", so none swaps)."""
    ids = {}
    for word in SWAPPED_WORDS:
        pieces, _ = tokenizer.encode_words([word])
        if len(pieces) != 1:
            return {}
        ids[word] = pieces[0]
    return {ids[word]: ids[other] for word, other in SWAPPED_WORDS.items()}


def region_boxes(expression: ReferringExpression, width: int, height: int, add_annotation_boxes: bool) -> np.ndarray:
    """[1 + N (+ M), 4] float32 regions in original pixels: the whole image `[0, 0, w - 1, h - 1]`,
    the candidates, then (with `add_annotation_boxes`) every annotation of the image, in file order
    and not deduplicated against the candidates."""
    boxes = [np.asarray([[0.0, 0.0, width - 1.0, height - 1.0]], dtype=np.float32), expression.candidate_boxes]
    if add_annotation_boxes:
        boxes.append(expression.annotation_boxes)
    return np.concatenate(boxes).astype(np.float32)


class RefCocoDataset(Dataset):
    """Referring expressions → `EncodedSample`s with pixels, boxes and per-region labels.

    Regions, in order: the whole image `[0, 0, w - 1, h - 1]`, the reader's candidate boxes,
    and (with `add_annotation_boxes`) the image's ground-truth annotation boxes. All boxes and
    the referred box are scaled by the transform's per-axis scale and clamped to the resized
    image (`scale_boxes`), then mirrored when the sample is flipped; the labels compare these
    transformed boxes with the transformed referred box (`refcoco_labels`: IoU with +1 pixel
    widths > 0.5), as VL-BERT's RefCOCO dataset does. The whole-image box therefore becomes
    `[0, 0, min((w - 1) * sx, W - 1), ...]`, not always `[0, 0, W - 1, H - 1]`.

    A flipped sample (drawn per index and epoch: `sample_random(seed, epoch, index)`) has
    its pixels and boxes mirrored and every WordPiece that is exactly "left" or "right" swapped
    (VL-BERT's `flip_tokens` works on the pieces, so "leftmost" → "right ##most" too).

    Args:
        reader: the split's referring expressions.
        image_root: folder of the COCO train2014 images (`image_file_name` is relative to it;
            a `train2014.zip@` prefix reads them from a zip archive).
        tokenizer: WordPiece tokenizer (`encode_words`, `cls_id`, `sep_id`).
        image_transform: resize and normalisation of the pixels.
        add_annotation_boxes: append every COCO annotation of the image after the candidates
            (VL-BERT trains on detected proposals plus the image's ground-truth boxes, and
            evaluates on proposals only).
        flip_probability: share of samples flipped horizontally (VL-BERT: 0.5 when training).
        seed: makes the flip draws reproducible per sample index.
    """

    def __init__(
        self,
        reader: RefCocoReader,
        image_root: str | Path,
        tokenizer: Tokenizer,
        image_transform: ImageTransform,
        add_annotation_boxes: bool = False,
        flip_probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.reader = reader
        self.image_root = Path(image_root)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.add_annotation_boxes = add_annotation_boxes
        self.flip_probability = flip_probability
        self.seed = seed
        self._swapped_pieces = swapped_piece_ids(tokenizer)

    def __len__(self) -> int:
        return len(self.reader)

    def length(self, index: int) -> int:
        """Expression words + regions of a sample (reads the ref, not the image): what a
        length-bucketing sampler sorts by."""
        expression = self.reader[index]
        extra = len(expression.annotation_boxes) if self.add_annotation_boxes else 0
        return len(expression.tokens) + 1 + len(expression.candidate_boxes) + extra

    def __getitem__(self, index: int) -> EncodedSample:
        return self.item_in_epoch(index, 0)

    def item_in_epoch(self, index: int, epoch: int) -> EncodedSample:
        """Sample `index` with the flip draw of `epoch`."""
        return self.encode(self.reader[index], flip=self.draws_flip(index, epoch))

    def image_scale(self, index: int) -> tuple[float, float]:
        """(x, y) factors from sample `index`'s original image to its resized pixels, those
        `encode` multiplies the boxes by (the official `im_info[2:4]`). Reads the image."""
        width, height = open_coco_image(self.reader[index], self.image_root).size  # the header only: no decoding
        new_width, new_height = self.image_transform.resized_size(width, height)
        return new_width / width, new_height / height

    def draws_flip(self, index: int, epoch: int = 0) -> bool:
        """Whether sample `index` is flipped in `epoch` (the same answer on every call)."""
        return sample_random(self.seed, epoch, index).random() < self.flip_probability

    def encode(
        self, expression: ReferringExpression, index: int = 0, flip: Optional[bool] = None, picture: Optional[Image.Image] = None
    ) -> EncodedSample:
        """One referring expression → sample; `flip` forces the flip on or off, None draws it
        for `index`; `picture` (RGB) stands in for the expression's image file (inference on a
        user's image).

        Returns:
            EncodedSample with text_ids / word_index [L], boxes [N, 4] in resized-image pixels,
            region_labels [N] float32, image [3, H, W], image_size (W, H).
        """
        flip = self.draws_flip(index) if flip is None else flip
        pieces, words = self.tokenizer.encode_words(expression.tokens)
        if flip:
            pieces = [self._swapped_pieces.get(piece, piece) for piece in pieces]
        text_ids = np.asarray([self.tokenizer.cls_id, *pieces, self.tokenizer.sep_id], dtype=np.int64)
        word_index = np.asarray([-1, *words, -1], dtype=np.int64)

        picture = load_coco_image(expression, self.image_root) if picture is None else picture
        original_boxes = region_boxes(expression, picture.size[0], picture.size[1], self.add_annotation_boxes)
        image, scale = self.image_transform.pixels(picture)
        new_width, new_height = image.shape[2], image.shape[1]
        boxes = scale_boxes(original_boxes, scale, new_width, new_height)
        target = scale_boxes(expression.target_box[None].astype(np.float32), scale, new_width, new_height)
        if flip:
            image, boxes, target = flip_image(image), flip_boxes(boxes, new_width), flip_boxes(target, new_width)
        return EncodedSample(
            text_ids=text_ids,
            word_index=word_index,
            boxes=boxes,
            class_scores=None,
            features=None,
            image=image,
            image_size=(new_width, new_height),
            region_labels=refcoco_labels(boxes, target[0]).astype(np.float32),
            pixel_normalization=self.image_transform.normalization(),
        )


def box_accuracy(predicted: np.ndarray, targets: np.ndarray) -> float:
    """Share of predicted boxes [E, 4] whose `iou_plus_one` with their target [E, 4] (both
    x1, y1, x2, y2 in the original image) is at least 0.5, as the official
    `refcoco/function/test.py` scores a split (>=, where the training labels use >)."""
    if len(predicted) == 0 or np.shape(predicted) != np.shape(targets):
        raise ValueError(f"box_accuracy needs as many predicted boxes as targets, [E, 4] each, got {np.shape(predicted)} and {np.shape(targets)}")
    return float((iou_plus_one(predicted, targets) >= POSITIVE_IOU).mean())


def load_coco_image(expression: ReferringExpression, image_root: Path) -> Image.Image:
    """The expression's COCO image as RGB, pixels as stored (see `open_coco_image`)."""
    image = open_coco_image(expression, image_root)
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{expression.record}, field 'file_name': cannot decode {expression.image_file_name} ({error})") from None


def open_coco_image(expression: ReferringExpression, image_root: Path) -> Image.Image:
    """The expression's COCO image, opened lazily (its size is known, its pixels not yet decoded).

    EXIF orientation is deliberately not applied: COCO's boxes and image sizes refer to the
    stored pixel grid (VL-BERT and pycocotools-based loaders read it the same way).

    Raises:
        DataError: "<record>, field 'file_name': ..." when the image has no file name in
            `instances.json`, or the file is missing or cannot be decoded.
    """
    where = f"{expression.record}, field 'file_name'"
    name = expression.image_file_name
    if name is None:
        raise DataError(f"{where}: image {expression.image_id} has no file_name in instances.json")
    try:
        data = zipped.read_bytes(name, image_root)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: cannot decode {name} ({error})") from None


def refcoco_data(
    root: Optional[str] = None,
    dataset: str = "refcoco+",
    split_by: str = "unc",
    boxes: str = "gt",
    train_split: str = "train",
    val_split: str = "val",
    images: str = "train2014",
    proposals: str = "refcoco+/proposal/res101_coco_minus_refer_notime_dets.json",
    vocab: Optional[str] = None,
    image_transform: Optional[ImageTransform] = None,
    demo: DemoScenes = DemoScenes(),
    coco_instances: Optional[str] = None,
    flip_probability: float = 0.5,
    seed: int = 0,
) -> RunData:
    """RefCOCO-family train and validation datasets in the official layout.

    Layout under `root`: `<dataset>/refs(<split_by>).p`, `<dataset>/instances.json`, the COCO
    2014 images in `<images>/` (every RefCOCO image is a train2014 image) and, for detected
    boxes, `proposals` (MAttNet's detections); VL-BERT also reads the images' ground-truth boxes
    from COCO's `annotations/instances_train2014.json` (`coco_instances`).

    Args:
        root: the data folder; None writes and reads the embedded demo data (drawn scenes in
            this layout, `vlblocks.data.demo.task_data`).
        dataset: "refcoco", "refcoco+" or "refcocog".
        split_by: "unc" (RefCOCO, RefCOCO+) or "umd" / "google" (RefCOCOg).
        boxes: "gt" (candidates are the image's COCO annotations) or "detected" (the proposals;
            training adds every COCO annotation of the image after them, validation does not:
            VL-BERT's "proposal+gt" / "proposal").
        train_split, val_split: splits of the refs file ("train", "val", "testA", "testB", "test").
        images: folder of the images, relative to `root`.
        proposals: proposals file, relative to `root` (read only for detected boxes).
        vocab: WordPiece `vocab.txt` (bert-base-uncased's).
        image_transform: pixel pipeline; None uses VL-BERT's (600 / 1000, BGR caffe mean).
        demo: where, how many and how large the demo scenes are when `root` is None.
        coco_instances: COCO instances file, relative to `root`, holding every annotation of the
            images: the ground-truth boxes are read from it (VL-BERT:
            "annotations/instances_train2014.json", as the real-data recipes set). None reads
            them from `<dataset>/instances.json`, REFER's copy of the images' annotations.
        flip_probability: share of training samples flipped horizontally, with "left" and
            "right" swapped in the expression (VL-BERT's TRAIN.FLIP_PROB 0.5; validation never).
        seed: seeds the per-sample flip draws.

    Raises:
        ValueError: `boxes` is not "gt" / "detected", or `vocab` is unset.
        FileNotFoundError: a file is missing (the message names the binding to set).
    """
    if boxes not in BOX_SOURCES:
        raise ValueError(f"refcoco_data.boxes must be one of {BOX_SOURCES}, got {boxes!r}")
    demo_paths = None
    if root is None:
        demo_paths = write_demo_task("refcoco", demo)
        root, vocab = str(demo_paths.root), str(demo_paths.vocab)
        image_transform = demo_transform(image_transform, demo.image_size)
    if vocab is None:
        raise ValueError("refcoco_data.vocab is unset: give the WordPiece vocab.txt (bert-base-uncased's)")
    base = existing_file(root, "RefCOCO data folder", "refcoco_data.root")
    refs_file = existing_file(base / dataset / f"refs({split_by}).p", "refs file", "refcoco_data.dataset / split_by")
    instances_file = existing_file(base / dataset / "instances.json", "COCO instances file", "refcoco_data.dataset")
    image_root = existing_file(base / images, "COCO train2014 image folder", "refcoco_data.images")
    proposals_file = None
    if boxes == "detected":
        proposals_file = existing_file(base / proposals, "detected proposals file", "refcoco_data.proposals")
    annotations_file = None
    if coco_instances is not None:
        annotations_file = existing_file(base / coco_instances, "COCO instances file", "refcoco_data.coco_instances")
    tokenizer = WordPieceTokenizer(existing_file(vocab, "WordPiece vocab.txt", "refcoco_data.vocab"))
    transform = image_transform if image_transform is not None else ImageTransform()

    def build(split: str, training: bool) -> RefCocoDataset:
        reader = RefCocoReader(refs_file, instances_file, split, proposals_file, annotations_file=annotations_file)
        add_annotation_boxes = training and boxes == "detected"
        flips = flip_probability if training else 0.0
        return RefCocoDataset(reader, image_root, tokenizer, transform, add_annotation_boxes, flips, seed)

    return RunData(
        train=build(train_split, training=True),
        val=build(val_split, training=False),
        tokenizer=tokenizer,
        description=demo_description("RefCOCO+", demo_paths, "refcoco_data.root") if demo_paths else (
            f"{dataset} ({split_by}) referring expressions with {boxes} boxes: training on {train_split}, "
            f"validating on {val_split} ({refs_file}, images in {image_root})"
        ),
        collate=collate_pretraining,
        is_demo=demo_paths is not None,
    )
