"""Collation with dynamic padding: each batch is padded to its own longest row."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vlblocks.batch import VLBatch
from vlblocks.data.pretraining import EncodedSample
from vlblocks.data.text_corpus import TextChunk


def _pad(arrays: Sequence[np.ndarray], length: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(arrays), length, *arrays[0].shape[1:]), value, dtype=dtype)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = torch.as_tensor(array, dtype=dtype)
    return out


def collate_pretraining(samples: Sequence[EncodedSample]) -> VLBatch:
    """Image-text samples → `VLBatch` padded to the longest text, region list and image."""
    text_length = max(len(s.text_ids) for s in samples)
    regions = max(len(s.boxes) for s in samples)
    images = None
    if samples[0].image is not None:
        height = max(s.image.shape[1] for s in samples)
        width = max(s.image.shape[2] for s in samples)
        images = torch.zeros(len(samples), 3, height, width)
        for row, sample in enumerate(samples):
            images[row, :, : sample.image.shape[1], : sample.image.shape[2]] = sample.image
    features = None
    if samples[0].features is not None:
        features = _pad([s.features for s in samples], regions, 0.0, torch.float32)
    text_ids = _pad([s.text_ids for s in samples], text_length, 0, torch.long)
    return VLBatch(
        text_ids=text_ids,
        segment_ids=torch.zeros_like(text_ids),
        text_mask=_pad([np.ones(len(s.text_ids), bool) for s in samples], text_length, False, torch.bool),
        boxes=_pad([s.boxes for s in samples], regions, 0.0, torch.float32),
        region_mask=_pad([np.ones(len(s.boxes), bool) for s in samples], regions, False, torch.bool),
        image_sizes=torch.tensor([s.image_size for s in samples], dtype=torch.float32),
        region_features=features,
        images=images,
        word_index=_pad([s.word_index for s in samples], text_length, -1, torch.long),
        region_class_scores=_pad([s.class_scores for s in samples], regions, 0.0, torch.float32),
    )


def collate_text(samples: Sequence[TextChunk]) -> VLBatch:
    """Text-only chunks → `VLBatch` with no regions (the text-only stream)."""
    text_length = max(len(s.text_ids) for s in samples)
    text_ids = _pad([s.text_ids for s in samples], text_length, 0, torch.long)
    batch = len(samples)
    return VLBatch(
        text_ids=text_ids,
        segment_ids=torch.zeros_like(text_ids),
        text_mask=_pad([np.ones(len(s.text_ids), bool) for s in samples], text_length, False, torch.bool),
        boxes=torch.zeros(batch, 0, 4),
        region_mask=torch.zeros(batch, 0, dtype=torch.bool),
        image_sizes=torch.ones(batch, 2),
        word_index=_pad([s.word_index for s in samples], text_length, -1, torch.long),
    )
