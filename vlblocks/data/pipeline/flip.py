"""Horizontal flip of an image-text sample: pixels, boxes, and the words "left" and "right"."""

from __future__ import annotations

import numpy as np
import torch

SWAPPED_WORDS = {"left": "right", "right": "left"}


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """[N, 4] boxes in a `width`-pixel image mirrored: x → width - 1 - x (x1 and x2 swap roles),
    the official `RandomHorizontalFlip`'s formula (pretrain/data/transforms/transforms.py)."""
    flipped = boxes.copy()
    flipped[:, 0] = width - 1 - boxes[:, 2]
    flipped[:, 2] = width - 1 - boxes[:, 0]
    return flipped


def flip_words(words: list[str]) -> list[str]:
    """Swap "left" and "right" (VQA and RefCOCO+ do this so the text still matches the flipped image)."""
    return [SWAPPED_WORDS.get(word.lower(), word) for word in words]


def flip_image(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] → mirrored along W."""
    return image.flip(-1)
