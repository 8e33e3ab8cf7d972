"""Samples ready for collation: an image-text `EncodedSample` and a text-only `TextChunk`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import Tensor


@dataclass
class EncodedSample:
    """One sample ready for collation.

    text_ids / word_index: [L] (word_index -1 at [CLS]/[SEP]). boxes: [N, 4] with the whole
    image first, in the pixels of `image` (end to end) or of the original image (precomputed).
    class_scores: [N, C], zero row for the whole image. features: [N, D] or None (region 0 =
    mean of the file's regions). image: [3, H, W] uint8 as read (normalised on the device with
    `pixel_normalization`, (mean, std) of 3 floats each) or float32 normalised, or None. image_extent:
    (width, height) of the real pixels of a uint8 image, (0, 0) when it is blanked (None: all of
    it). image_size: (width, height).

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
    pixel_normalization: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
    image_extent: Optional[tuple[int, int]] = None
    dropped_boxes: Optional[np.ndarray] = None  # [M, 4] boxes the budget cut off (pre-training), frame of `boxes`
    dropped_features: Optional[np.ndarray] = None  # [M, D] their precomputed features


@dataclass
class TextChunk:
    """`text_ids` [L] raw WordPieces (no [CLS]/[SEP]); `word_index` [L] word of each piece,
    numbered within the chunk so whole-word masking keeps words together; `position`: the
    chunk's number in the stream (its identity, e.g. for its masking seed)."""

    text_ids: np.ndarray
    word_index: np.ndarray
    position: int = 0
