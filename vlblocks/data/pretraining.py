"""Image-text pre-training samples: tokenise, truncate, add the whole-image box, load pixels."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlblocks.data.errors import DataError
from vlblocks.data.example import ImageTextExample
from vlblocks.data.flip import flip_boxes, flip_image, flip_words
from vlblocks.data.images import ImageTransform, scale_boxes


LOG = logging.getLogger("vlblocks.data")


class Tokenizer(Protocol):
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int

    def encode_words(self, words: list[str]) -> tuple[list[int], list[int]]: ...


@dataclass
class EncodedSample:
    """One sample ready for collation.

    text_ids / word_index: [L] (word_index -1 at [CLS]/[SEP]). boxes: [N, 4] with the whole
    image first, in the pixels of `image` (end to end) or of the original image (precomputed).
    class_scores: [N, C], zero row for the whole image. features: [N, D] or None (region 0 =
    mean of the file's regions). image: [3, H, W] or None. image_size: (width, height).

    Fine-tuning samples add: segment_ids [L] (None: all segment A); token_regions [L], the
    region each token sees (None: the whole image); answer_position (VQA's [MASK] slot);
    answer_scores [A]; choice_label (1.0 for the right choice); region_labels [N] float;
    region_classes [N] long; region_masks [N, M, M] float instance masks.
    """

    text_ids: np.ndarray
    word_index: np.ndarray
    boxes: np.ndarray
    class_scores: Optional[np.ndarray]
    features: Optional[np.ndarray]
    image: Optional[Tensor]
    image_size: tuple[int, int]
    segment_ids: Optional[np.ndarray] = None
    token_regions: Optional[np.ndarray] = None
    answer_position: Optional[int] = None
    answer_scores: Optional[np.ndarray] = None
    choice_label: Optional[float] = None
    region_labels: Optional[np.ndarray] = None
    region_classes: Optional[np.ndarray] = None
    region_masks: Optional[np.ndarray] = None


def truncate_to_budget(text_length: int, box_count: int, budget: int) -> tuple[int, int]:
    """VL-BERT's caption truncation: while text + boxes exceed `budget`, drop a box if there are
    more boxes than tokens, else a token (ties drop text); keep at least 2 tokens and 1 box."""
    while text_length + box_count > budget:
        if box_count > text_length and box_count > 1:
            box_count -= 1
        elif text_length > 2:
            text_length -= 1
        elif box_count > 1:
            box_count -= 1
        else:
            break
    return text_length, box_count


class PretrainingDataset(Dataset):
    """`[CLS] caption [SEP]` with the whole-image box and the detector's boxes.

    Args:
        reader: random-access sequence of `ImageTextExample`s (e.g. ConceptualCaptionsReader).
        tokenizer: WordPiece tokenizer (`encode_words`, `cls_id`, `sep_id`).
        image_transform: end-to-end pixels when given; None reads precomputed features.
        max_elements: text tokens + boxes (whole image included) per sample (64 in VL-BERT).
        blank_image_probability: share of samples whose image (or features) is blanked: the
            mean colour (zeros after normalisation). Lets "no image" be in distribution when
            measuring what the image contributes.
        drop_caption_probability: share of samples whose caption is dropped (`[CLS] [SEP]`).
        seed: makes the blanking and dropping reproducible per sample index.
        class_columns: pad the detector's class distributions with zero columns to this many
            classes (the demo's 5 classes inside a 1601-way region head); None keeps them.
        flip_probability: share of samples flipped horizontally (pixels and boxes), with
            "left" and "right" swapped in the caption. End-to-end only; 0 in VL-BERT pre-training.
        skip_bad_records: on a malformed record, log it in `skipped` and use the next one
            instead of stopping (the default names the record and stops).
    """

    def __init__(
        self,
        reader: Sequence[ImageTextExample],
        tokenizer: Tokenizer,
        image_transform: Optional[ImageTransform] = None,
        max_elements: int = 64,
        blank_image_probability: float = 0.0,
        drop_caption_probability: float = 0.0,
        seed: int = 0,
        class_columns: Optional[int] = None,
        flip_probability: float = 0.0,
        skip_bad_records: bool = False,
    ) -> None:
        self.reader = reader
        self.class_columns = class_columns
        self.flip_probability = flip_probability
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_elements = max_elements
        self.blank_image_probability = blank_image_probability
        self.drop_caption_probability = drop_caption_probability
        self.seed = seed

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> EncodedSample:
        if not self.skip_bad_records:
            return self.encode(self.reader[index], index)
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self.encode(self.reader[position], position)
            except DataError as error:
                self.skipped.append(str(error))
                LOG.warning("skipped bad record (%d so far): %s", len(self.skipped), error)
        raise DataError("every record of the dataset is bad")

    def length(self, index: int) -> int:
        """Caption words + boxes of a record (reads it): what a length-bucketing sampler sorts by."""
        example = self.reader[index]
        return len(example.caption) + len(example.boxes)

    def encode(self, example: ImageTextExample, index: int = 0, blank_image: Optional[bool] = None, drop_caption: Optional[bool] = None) -> EncodedSample:
        chance = random.Random(self.seed * 1_000_003 + index)
        blank_image = chance.random() < self.blank_image_probability if blank_image is None else blank_image
        drop_caption = chance.random() < self.drop_caption_probability if drop_caption is None else drop_caption
        flip = self.image_transform is not None and chance.random() < self.flip_probability
        caption = flip_words(example.caption) if flip else example.caption
        pieces, words = self.tokenizer.encode_words([] if drop_caption else caption)
        text_length, box_count = truncate_to_budget(len(pieces) + 2, len(example.boxes) + 1, self.max_elements)
        pieces, words = pieces[: text_length - 2], words[: text_length - 2]
        text_ids = np.asarray([self.tokenizer.cls_id, *pieces, self.tokenizer.sep_id], dtype=np.int64)
        word_index = np.asarray([-1, *words, -1], dtype=np.int64)

        width, height = example.image_width, example.image_height
        boxes = example.boxes[: box_count - 1].astype(np.float32)
        scores = example.class_scores[: box_count - 1].astype(np.float32)
        if self.class_columns is not None and scores.shape[1] < self.class_columns:
            scores = np.pad(scores, ((0, 0), (0, self.class_columns - scores.shape[1])))
        features = None
        image = None
        if self.image_transform is None:
            if example.features is None:
                raise ValueError(f"{example.record}: no precomputed features, and the recipe reads no images")
            whole = example.features.mean(0, keepdims=True)  # over all boxes in the file, before truncation
            features = np.concatenate([whole, example.features[: box_count - 1]]).astype(np.float32)
            if blank_image:
                features = np.zeros_like(features)
        else:
            if example.load_image is None:
                raise ValueError(f"{example.record}: the recipe computes features from pixels, but the record has no image")
            image, scale = self.image_transform(example.load_image())
            width, height = image.shape[2], image.shape[1]
            boxes = scale_boxes(boxes, scale, width, height)
            if flip:
                image, boxes = flip_image(image), flip_boxes(boxes, width)
            if blank_image:
                image = torch.zeros_like(image)
        whole_box = np.asarray([[0.0, 0.0, width - 1.0, height - 1.0]], dtype=np.float32)
        return EncodedSample(
            text_ids=text_ids,
            word_index=word_index,
            boxes=np.concatenate([whole_box, boxes]),
            class_scores=np.concatenate([np.zeros((1, scores.shape[1]), np.float32), scores]),
            features=features,
            image=image,
            image_size=(width, height),
        )
