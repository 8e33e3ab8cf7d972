"""The picture of `vlblocks attention`: one panel per word, the image with its boxes shaded by how
much that word attends to each (Pillow only)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_WIDTH = 240  # each panel shows the image scaled to this width (aspect kept)
TITLE_HEIGHT = 16  # the band above each panel that names its word
MARGIN = 8  # around and between panels
COLUMNS = 4  # panels per row at most
SHADE_RGB = (255, 0, 0)
MAX_ALPHA = 0.6  # the most attended box of the figure is shaded at this opacity
OUTLINE_RGB = (255, 255, 0)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)


def figure_size(image_size: tuple[int, int], panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of `panels` panels of an image of `image_size` (width, height)."""
    columns, rows = min(COLUMNS, panels), math.ceil(panels / COLUMNS)
    panel_height = panel_image_height(image_size)
    return columns * PANEL_WIDTH + (columns + 1) * MARGIN, rows * (TITLE_HEIGHT + panel_height) + (rows + 1) * MARGIN


def panel_image_height(image_size: tuple[int, int]) -> int:
    """Height of the image in a panel: scaled with its width to `PANEL_WIDTH`."""
    width, height = image_size
    return max(1, round(height * PANEL_WIDTH / width))


def shade_alphas(attention: np.ndarray) -> np.ndarray:
    """[W, N] attention → [W, N] opacities in [0, MAX_ALPHA]: proportional to the attention,
    the largest value of the whole figure at `MAX_ALPHA` (so panels compare), 0 everywhere when
    every value is 0."""
    peak = float(attention.max()) if attention.size else 0.0
    if peak <= 0.0:
        return np.zeros_like(attention, dtype=np.float64)
    return np.clip(attention / peak, 0.0, 1.0) * MAX_ALPHA


def draw_attention(
    image: Image.Image, boxes: np.ndarray, words: Sequence[str], attention: np.ndarray, image_share: Sequence[float] | None = None
) -> Image.Image:
    """The figure: per word (row of `attention`) a panel titled with the word, showing `image`
    with box j shaded red in proportion to `attention[word, j]` (see `shade_alphas`), outlined
    and labelled with its number and the value.

    Args:
        image: the picture, in the pixels `boxes` are given in.
        boxes: [N, 4] (x1, y1, x2, y2) in `image`'s pixels.
        words: W words, one per panel.
        attention: [W, N] how much each word attends to each box.
        image_share: W values added to the titles (the whole-image region's attention), or None.

    Returns:
        RGB image of `figure_size(image.size, W)`.
    """
    if attention.shape != (len(words), len(boxes)):
        raise ValueError(f"attention is {tuple(attention.shape)}, expected ({len(words)} words, {len(boxes)} boxes)")
    width, height = figure_size(image.size, len(words))
    figure = Image.new("RGB", (width, height), BACKGROUND_RGB)
    scale = PANEL_WIDTH / image.size[0]
    picture = image.convert("RGB").resize((PANEL_WIDTH, panel_image_height(image.size)), Image.BILINEAR)
    alphas = shade_alphas(attention)
    font = ImageFont.load_default()
    for index, word in enumerate(words):
        left = MARGIN + (index % COLUMNS) * (PANEL_WIDTH + MARGIN)
        top = MARGIN + (index // COLUMNS) * (TITLE_HEIGHT + picture.height + MARGIN)
        title = word if image_share is None else f"{word}  (whole image {image_share[index]:.2f})"
        ImageDraw.Draw(figure).text((left, top + 2), title, fill=TEXT_RGB, font=font)
        panel = shade_boxes(picture, boxes * scale, alphas[index], attention[index], font)
        figure.paste(panel, (left, top + TITLE_HEIGHT))
    return figure


def shade_boxes(picture: Image.Image, boxes: np.ndarray, alphas: np.ndarray, values: np.ndarray, font: ImageFont.ImageFont) -> Image.Image:
    """A copy of `picture` with each box [N, 4] (its pixels) filled red at its opacity [N]
    (weakest first, so the strongest stays on top where boxes overlap), then every outline and
    label "#number value" drawn over the fills."""
    panel = picture.copy()
    shading = ImageDraw.Draw(panel, "RGBA")
    for j in np.argsort(alphas, kind="stable"):
        shading.rectangle(_rectangle(boxes[j]), fill=(*SHADE_RGB, round(255 * float(alphas[j]))))
    lines = ImageDraw.Draw(panel)
    for j, box in enumerate(boxes):
        lines.rectangle(_rectangle(box), outline=OUTLINE_RGB)
        lines.text((box[0] + 2, box[1] + 1), f"#{j + 1} {values[j]:.2f}", fill=OUTLINE_RGB, font=font)
    return panel


def _rectangle(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2]), float(box[3])]
