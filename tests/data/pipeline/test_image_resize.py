"""Image sizes after resizing, as the official `Resize.get_size` (VL-BERT's transforms.py) gives them."""

import pytest
from PIL import Image

from vlblocks.data.pipeline.images import ImageTransform


@pytest.mark.parametrize(
    "size, sides, expected",
    [
        ((640, 480), (600, 1000), (800, 600)),  # 600 x 640 / 480 = 800 exactly
        ((500, 333), (600, 1000), (900, 600)),  # 600 x 500 / 333 = 900.90 truncated (rounding gave 901)
        ((333, 500), (600, 1000), (600, 900)),
        ((1200, 350), (600, 1000), (997, 291)),  # capped: int(1000 x 350 / 1200) = 291, then int(291 x 1200 / 350) = 997
        ((1000, 300), (600, 1000), (1000, 300)),  # capped at int(1000 x 300 / 1000) = 300 = the shorter side: unchanged
        ((800, 600), (600, 1200), (800, 600)),  # already 600 on the shorter side
        ((64, 64), (600, 1000), (600, 600)),
    ],
)
def test_resized_size_truncates_like_the_official_resize(size, sides, expected):
    assert ImageTransform(*sides).resized_size(*size) == expected


def test_pixels_and_scales_follow_the_resized_size():
    pixels, scale = ImageTransform(600, 1000).pixels(Image.new("RGB", (500, 333)))
    assert tuple(pixels.shape) == (3, 600, 900)
    assert scale == (900 / 500, 600 / 333)
