"""RefCOCO / RefCOCO+ / RefCOCOg fine-tuning samples, as VL-BERT builds them.

Each sample is `[CLS] expression [SEP]` (segment A, every token sees the whole image) with the
regions: the whole image first, then the candidate boxes (ground-truth annotations or detected
proposals), then, when training on proposals, the ground-truth box itself. `region_labels`
marks the regions whose box overlaps the referred object with IoU > 0.5.
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
from vlblocks.data.formats.refcoco import RefCocoReader, ReferringExpression, refcoco_labels
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.images import ImageTransform, scale_boxes
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer

__all__ = ["RefCocoDataset", "refcoco_data"]

BOX_SOURCES = ("gt", "detected")


class RefCocoDataset(Dataset):
    """Referring expressions → `EncodedSample`s with pixels, boxes and per-region labels.

    Regions, in order: the whole image `[0, 0, w - 1, h - 1]`, the reader's candidate boxes,
    and (with `add_target_box`) the target box. Labels are computed on the boxes in original
    image pixels (`refcoco_labels`: IoU with +1 pixel widths > 0.5), the whole-image box
    included. All boxes, the whole-image one too, are then scaled by the transform's per-axis
    scale and clamped to the resized image (`scale_boxes`), as VL-BERT transforms its box list;
    so the whole-image box becomes `[0, 0, min((w - 1) * sx, W - 1), ...]`, not always
    `[0, 0, W - 1, H - 1]`.

    Args:
        reader: the split's referring expressions.
        image_root: folder of the COCO train2014 images (`image_file_name` is relative to it;
            a `train2014.zip@` prefix reads them from a zip archive).
        tokenizer: WordPiece tokenizer (`encode_words`, `cls_id`, `sep_id`).
        image_transform: resize and normalisation of the pixels.
        add_target_box: append the target box as one more candidate (VL-BERT trains on detected
            proposals plus the ground-truth box, and evaluates on proposals only).
    """

    def __init__(
        self,
        reader: RefCocoReader,
        image_root: str | Path,
        tokenizer: Tokenizer,
        image_transform: ImageTransform,
        add_target_box: bool = False,
    ) -> None:
        self.reader = reader
        self.image_root = Path(image_root)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.add_target_box = add_target_box

    def __len__(self) -> int:
        return len(self.reader)

    def length(self, index: int) -> int:
        """Expression words + regions of a sample (reads the ref, not the image): what a
        length-bucketing sampler sorts by."""
        expression = self.reader[index]
        return len(expression.tokens) + 1 + len(expression.candidate_boxes) + int(self.add_target_box)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.encode(self.reader[index])

    def encode(self, expression: ReferringExpression) -> EncodedSample:
        """One referring expression → sample.

        Returns:
            EncodedSample with text_ids / word_index [L], boxes [N, 4] in resized-image pixels,
            region_labels [N] float32, image [3, H, W], image_size (W, H).
        """
        pieces, words = self.tokenizer.encode_words(expression.tokens)
        text_ids = np.asarray([self.tokenizer.cls_id, *pieces, self.tokenizer.sep_id], dtype=np.int64)
        word_index = np.asarray([-1, *words, -1], dtype=np.int64)

        picture = load_coco_image(expression, self.image_root)
        width, height = picture.size
        boxes = [np.asarray([[0.0, 0.0, width - 1.0, height - 1.0]], dtype=np.float32), expression.candidate_boxes]
        if self.add_target_box:
            boxes.append(expression.target_box[None])
        original_boxes = np.concatenate(boxes).astype(np.float32)
        labels = refcoco_labels(original_boxes, expression.target_box).astype(np.float32)

        image, scale = self.image_transform.pixels(picture)
        new_width, new_height = image.shape[2], image.shape[1]
        return EncodedSample(
            text_ids=text_ids,
            word_index=word_index,
            boxes=scale_boxes(original_boxes, scale, new_width, new_height),
            class_scores=None,
            features=None,
            image=image,
            image_size=(new_width, new_height),
            region_labels=labels,
            pixel_normalization=self.image_transform.normalization(),
        )


def load_coco_image(expression: ReferringExpression, image_root: Path) -> Image.Image:
    """The expression's COCO image as RGB, pixels as stored.

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
        return Image.open(io.BytesIO(data)).convert("RGB")
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
) -> RunData:
    """RefCOCO-family train and validation datasets in the official layout.

    Layout under `root`: `<dataset>/refs(<split_by>).p`, `<dataset>/instances.json`, the COCO
    2014 images in `<images>/` (every RefCOCO image is a train2014 image) and, for detected
    boxes, `proposals` (MAttNet's detections).

    Args:
        root: the data folder; None writes and reads the embedded demo data (drawn scenes in
            this layout, `vlblocks.data.demo.task_data`).
        dataset: "refcoco", "refcoco+" or "refcocog".
        split_by: "unc" (RefCOCO, RefCOCO+) or "umd" / "google" (RefCOCOg).
        boxes: "gt" (candidates are the image's COCO annotations) or "detected" (the proposals;
            training adds the ground-truth box, validation does not).
        train_split, val_split: splits of the refs file ("train", "val", "testA", "testB", "test").
        images: folder of the images, relative to `root`.
        proposals: proposals file, relative to `root` (read only for detected boxes).
        vocab: WordPiece `vocab.txt` (bert-base-uncased's).
        image_transform: pixel pipeline; None uses VL-BERT's (600 / 1000, BGR caffe mean).
        demo: where, how many and how large the demo scenes are when `root` is None.

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
    tokenizer = WordPieceTokenizer(existing_file(vocab, "WordPiece vocab.txt", "refcoco_data.vocab"))
    transform = image_transform if image_transform is not None else ImageTransform()

    def build(split: str, add_target_box: bool) -> RefCocoDataset:
        reader = RefCocoReader(refs_file, instances_file, split, proposals_file)
        return RefCocoDataset(reader, image_root, tokenizer, transform, add_target_box)

    detected = boxes == "detected"
    return RunData(
        train=build(train_split, add_target_box=detected),
        val=build(val_split, add_target_box=False),
        tokenizer=tokenizer,
        description=demo_description("RefCOCO+", demo_paths, "refcoco_data.root") if demo_paths else (
            f"{dataset} ({split_by}) referring expressions with {boxes} boxes: training on {train_split}, "
            f"validating on {val_split} ({refs_file}, images in {image_root})"
        ),
        collate=collate_pretraining,
        is_demo=demo_paths is not None,
    )
