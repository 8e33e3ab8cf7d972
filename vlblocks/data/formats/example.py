"""One image-text sample as a reader yields it, before tokenisation and collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image


@dataclass
class ImageTextExample:
    """A caption with its image and detected regions, in the image's original pixels.

    Attributes:
        record: where it came from, for error messages (e.g. "train_frcnn.json line 12").
        caption: the caption as basic-tokenised words (Conceptual Captions stores them so).
        image_width, image_height: original image size (the detector's `image_w`, `image_h`).
        boxes: [N, 4] float32 (x1, y1, x2, y2), sorted by the detector's max class score.
            The whole-image box is NOT included; the pipeline adds it.
        class_scores: [N, C] float32 detector class distribution (column 0 = background).
        features: [N, D] float32 precomputed region features, or None.
        load_image: returns the decoded RGB image (lazy: only end-to-end pipelines call it).
    """

    record: str
    caption: list[str]
    image_width: int
    image_height: int
    boxes: np.ndarray
    class_scores: np.ndarray
    features: Optional[np.ndarray] = None
    load_image: Optional[Callable[[], Image.Image]] = None
