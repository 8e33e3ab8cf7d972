"""The image pipeline: resize, flip-free normalisation to the backbone's convention, box scaling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlblocks.batch import normalize_pixels

CAFFE_BGR_MEAN = (102.98, 115.95, 122.77)


@dataclass
class ImageTransform:
    """Resize so the shorter side is `shorter_side` and the longer at most `longer_side`, then
    normalise: channels in BGR order (caffe-converted weights) or RGB, 0-255 minus `mean`,
    divided by `std`. VL-BERT: 600 / 1000, BGR, mean (102.98, 115.95, 122.77), std 1.

    `pixels`: PIL image → ([3, H, W] uint8 in the backbone's channel order, (x scale, y scale));
    the datasets send these, and the batch is normalised on its device (`VLBatch.to`) with
    `normalization()`. Call: PIL image → ([3, H, W] float32 normalised, scales), the same
    numbers at once. Each axis's scale is the ratio of the integer new size to the old, so boxes
    map exactly onto the resized pixels.
    """

    shorter_side: int = 600
    longer_side: int = 1000
    mean: Sequence[float] = CAFFE_BGR_MEAN
    std: Sequence[float] = (1.0, 1.0, 1.0)
    bgr: bool = True

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The official `Resize.get_size`: the shorter side becomes `shorter_side`, or the largest
        whole size that keeps the longer side within `longer_side`; the longer side is then
        truncated, not rounded (e.g. 500 x 333 → 900 x 600)."""
        shorter, longer = min(width, height), max(width, height)
        size = self.shorter_side
        if longer / shorter * size > self.longer_side:
            size = int(self.longer_side * shorter / longer)
        if shorter == size:
            return width, height
        if width < height:
            return max(1, size), max(1, int(size * height / width))
        return max(1, int(size * width / height)), max(1, size)

    def pixels(self, image: Image.Image) -> tuple[Tensor, tuple[float, float]]:
        width, height = image.size
        new_width, new_height = self.resized_size(width, height)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.BILINEAR)
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if self.bgr:
            pixels = pixels[..., ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return tensor, (new_width / width, new_height / height)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std), 3 floats each, in the channel order of `pixels`."""
        return tuple(map(float, self.mean)), tuple(map(float, self.std))

    def __call__(self, image: Image.Image) -> tuple[Tensor, tuple[float, float]]:
        pixels, scale = self.pixels(image)
        mean, std = (torch.tensor(values, dtype=torch.float32) for values in self.normalization())
        return normalize_pixels(pixels, mean, std), scale


def scale_boxes(boxes: np.ndarray, scale: tuple[float, float], width: int, height: int) -> np.ndarray:
    """Boxes [N, 4] scaled per axis and clamped to [0, width-1] x [0, height-1] of the resized image."""
    scaled = boxes * np.asarray([scale[0], scale[1], scale[0], scale[1]], dtype=np.float32)
    scaled[:, 0::2] = scaled[:, 0::2].clip(0, width - 1)
    scaled[:, 1::2] = scaled[:, 1::2].clip(0, height - 1)
    return scaled
