"""`vlblocks attention`: how much each word of a caption attends to each region of an image in a
trained pre-training checkpoint, per layer or averaged over the layers (always over the heads).

The sample is encoded by the recipe's own validation dataset (`PretrainingDataset.encode`, as in
training: `[CLS] words [SEP]`, the whole-image region first, then the given boxes; nothing
masked, blanked, dropped or flipped), which is what the official `pretrain/vis_attention_maps.py`
feeds its model (`cfgs/pretrain/vis_attention_maps_coco.yaml`: ADD_IMAGE_AS_A_BOX, no masking).
The official script only saves the [layers, heads, T, T] probabilities; the picture is ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import gin
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlblocks.app.attention_figure import draw_attention
from vlblocks.app.files import write_atomically
from vlblocks.app.inference import GRID_CELLS, InferenceError, grid_boxes, read_image
from vlblocks.app.run import build_run
from vlblocks.contracts import Echo
from vlblocks.data.datasets.pretraining import PretrainingDataset, encode_caption
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.formats.records import basic_tokenize
from vlblocks.models.vlbert import VLBert
from vlblocks.train.checkpoint import load_checkpoint
from vlblocks.train.device import resolve_device


class AttentionInputError(InferenceError):
    """An input of `vlblocks attention` (boxes, text, layer, output path) is unusable."""


@dataclass
class WordRegionAttention:
    """What a word attends to.

    Attributes:
        words: W words (BERT basic tokens of the text that kept at least one WordPiece).
        boxes: [N, 4] the given boxes in the original image's pixels (x1, y1, x2, y2).
        attention: [W, N + 1] mean attention probability from the word's pieces to each region:
            column 0 the whole-image region, column j the box j - 1.
        layer: 1-based layer shown, or None for the mean over all `layers`.
        layers: how many layers the encoder has.
    """

    words: list[str]
    boxes: np.ndarray
    attention: np.ndarray
    layer: Optional[int]
    layers: int


def parse_boxes(spec: str, source: str = "--boxes") -> np.ndarray:
    """'x1,y1,x2,y2;x1,y1,x2,y2;...' → [N, 4] float32. Raises `AttentionInputError` naming the box."""
    parts = [part.strip() for part in spec.split(";") if part.strip()]
    if not parts:
        raise AttentionInputError(f"{source}: no boxes (expected 'x1,y1,x2,y2;...')")
    return np.stack([_parse_box(part, f"{source} box {number}") for number, part in enumerate(parts, 1)])


def read_boxes_file(path: str | Path) -> np.ndarray:
    """[N, 4] float32 from a file: a JSON list of [x1, y1, x2, y2], or one 'x1,y1,x2,y2' per line
    (blank lines and lines starting with # skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AttentionInputError(f"{path}: cannot read the boxes file ({error.__class__.__name__})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise AttentionInputError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(rows, list) or not rows:
            raise AttentionInputError(f"{path}: expected a non-empty JSON list of [x1, y1, x2, y2]")
        return np.stack([_parse_box(row, f"{path} box {number}") for number, row in enumerate(rows, 1)])
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    boxes = [_parse_box(line, f"{path} line {number}") for number, line in lines if line and not line.startswith("#")]
    if not boxes:
        raise AttentionInputError(f"{path}: no boxes in the file")
    return np.stack(boxes)


def _parse_box(value: str | list, where: str) -> np.ndarray:
    """One box from 'x1,y1,x2,y2' or a 4-number list → [4] float32, x2 >= x1 and y2 >= y1."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        box = np.asarray([float(item) for item in items], dtype=np.float32) if isinstance(items, list) else None
    except (TypeError, ValueError):
        box = None
    if box is None or box.shape != (4,) or not np.isfinite(box).all():
        raise AttentionInputError(f"{where}: expected four numbers x1,y1,x2,y2, got {value!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise AttentionInputError(f"{where}: x2 < x1 or y2 < y1 in {value!r}")
    return box


def boxes_for(spec: Optional[str], boxes_file: Optional[str | Path], image_size: tuple[int, int]) -> np.ndarray:
    """The boxes the user asked for: `--boxes` (or 'grid' / 'grid:N', an explicit opt-in) or
    `--boxes-file`, checked to lie in the image. vlblocks ships no detector: neither is an error."""
    if spec is not None and boxes_file is not None:
        raise AttentionInputError("give --boxes or --boxes-file, not both")
    if spec is None and boxes_file is None:
        raise AttentionInputError(
            "no regions: give --boxes 'x1,y1,x2,y2;...' or --boxes-file (vlblocks ships no detector), "
            f"or --boxes grid for a {GRID_CELLS} x {GRID_CELLS} grid of boxes"
        )
    if spec is not None and spec.strip().lower().startswith("grid"):
        return grid_boxes(*image_size, _grid_cells(spec.strip()))
    boxes = parse_boxes(spec) if spec is not None else read_boxes_file(boxes_file)
    check_boxes_inside(boxes, image_size, "--boxes" if spec is not None else str(boxes_file))
    return boxes


def _grid_cells(spec: str) -> int:
    if spec.lower() == "grid":
        return GRID_CELLS
    _, _, cells = spec.partition(":")
    if not cells.isdigit() or not 1 <= int(cells) <= 10:
        raise AttentionInputError(f"--boxes {spec!r}: expected 'grid' or 'grid:N' with N from 1 to 10")
    return int(cells)


def check_boxes_inside(boxes: np.ndarray, image_size: tuple[int, int], source: str) -> None:
    """Every box [N, 4] within [0, width] x [0, height] (the right and bottom edges allowed, as
    the pipeline clamps to the last pixel). Raises `AttentionInputError` naming the first box outside."""
    width, height = image_size
    for number, (x1, y1, x2, y2) in enumerate(boxes.tolist(), 1):
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise AttentionInputError(f"{source} box {number} ({x1:g},{y1:g},{x2:g},{y2:g}) lies outside the {width} x {height} image")


def caption_words(text: str) -> list[str]:
    """The text's words as the pipeline splits them (BERT basic tokenisation)."""
    words = basic_tokenize(text)
    if not words:
        raise AttentionInputError(f"--text {text!r} has no words")
    return words


def parse_layer(value: str, layers: int) -> Optional[int]:
    """'all' → None (the mean over the layers); 'N' → N, a 1-based layer number up to `layers`."""
    if value.strip().lower() == "all":
        return None
    if not value.strip().isdigit() or not 1 <= int(value) <= layers:
        raise AttentionInputError(f"--layer {value!r}: expected 'all' or a layer number from 1 to {layers}")
    return int(value)


def mean_attention(attentions: Sequence[Tensor], layer: Optional[int]) -> Tensor:
    """Per-layer [1, heads, T, T] probabilities → [T, T]: the mean over the heads of `layer`
    (1-based), or over the heads and all layers when None."""
    chosen = attentions if layer is None else [attentions[layer - 1]]
    return torch.stack([probabilities[0].float().mean(0) for probabilities in chosen]).mean(0)


def word_region_matrix(attention: Tensor, word_index: Sequence[int], region_count: int) -> tuple[list[int], np.ndarray]:
    """How much each word attends to each region, from one sample's packed attention.

    Args:
        attention: [T, T] query x key probabilities of one unpadded sample, packed as
            [CLS] text [SEP] (L = len(word_index) slots), then the `region_count` regions, then [END].
        word_index: [L] the word of each text slot, -1 at [CLS] and [SEP].
        region_count: R regions (the whole image included).

    Returns:
        The word numbers in order, and [W, R]: per word, the mean over its WordPieces' query
        rows of the probability given to each region's key.
    """
    index = torch.as_tensor(list(word_index))
    length = len(index)
    words = sorted({int(i) for i in index.tolist() if i >= 0})
    to_regions = attention[:length, length : length + region_count]
    rows = [to_regions[index == word].mean(0) for word in words]
    return words, torch.stack(rows).double().cpu().numpy()


def attention_from_recipe(
    recipe: str | Path,
    bindings: Sequence[str],
    checkpoint: str | Path,
    image: Image.Image,
    image_name: str,
    text: str,
    boxes: np.ndarray,
    layer: str = "all",
    device: str | torch.device = "cpu",
    echo: Echo = print,
) -> WordRegionAttention:
    """Build the recipe's task, load `checkpoint`, encode (image, text, boxes) with the recipe's
    validation dataset and return the word-to-region attention (see `WordRegionAttention`)."""
    words = caption_words(text)
    task, data, _ = build_run(recipe, bindings, echo)
    dataset = data.val
    if not isinstance(dataset, PretrainingDataset):
        raise AttentionInputError(f"{recipe}: attention maps need a pre-training recipe (its validation split is a {type(dataset).__name__})")
    if dataset.image_transform is None:
        raise AttentionInputError(f"{recipe}: reads precomputed region features; attention maps from an image need an end-to-end recipe")
    vlbert = next((module for module in task.modules() if isinstance(module, VLBert)), None)
    if vlbert is None:
        raise AttentionInputError(f"{recipe}: the task {type(task).__name__} holds no VLBert")
    chosen = parse_layer(layer, len(vlbert.encoder.layer))
    load_checkpoint(task, checkpoint, gin.config_str())
    pieces, _ = encode_caption(dataset.tokenizer, words)
    elements = len(pieces) + 2 + len(boxes) + 1  # [CLS] pieces [SEP], the whole image and the boxes
    if elements > dataset.max_elements:
        raise AttentionInputError(
            f"{len(pieces)} WordPieces and {len(boxes)} boxes make {elements} elements, over the recipe's "
            f"{dataset.max_elements}: give fewer boxes or a shorter text"
        )
    sample = dataset.encode(_example(image, image_name, words, boxes), blank_image=False, drop_caption=False)
    device = resolve_device(device) if isinstance(device, str) else device
    vlbert.to(device).eval()
    with torch.no_grad():
        output = vlbert(data.collate([sample]).to(device), output_attentions=True)
    kept, matrix = word_region_matrix(mean_attention(output.attentions, chosen), sample.word_index.tolist(), len(sample.boxes))
    return WordRegionAttention([words[i] for i in kept], boxes, matrix, chosen, len(output.attentions))


def _example(image: Image.Image, name: str, words: list[str], boxes: np.ndarray) -> ImageTextExample:
    """The user's input as a reader would yield it (no detector classes: one zero column)."""
    return ImageTextExample(
        record=name,
        caption=words,
        image_width=image.width,
        image_height=image.height,
        boxes=boxes.astype(np.float32),
        class_scores=np.zeros((len(boxes), 1), np.float32),
        load_image=lambda: image,
    )


def check_output_path(out: str | Path) -> Path:
    """`out` must name a .png file in an existing folder (checked before any work)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise AttentionInputError(f"--out {out}: expected a .png file name")
    if not out.parent.is_dir():
        raise AttentionInputError(f"--out {out}: no such folder {out.parent}")
    return out


def write_attention_map(result: WordRegionAttention, image: Image.Image, out: str | Path) -> Path:
    """Draw `result` over `image` (one panel per word, the given boxes shaded; the whole-image
    region's share in each title) and write it to `out` atomically (nothing left on failure)."""
    out = check_output_path(out)
    figure = draw_attention(image, result.boxes, result.words, result.attention[:, 1:], result.attention[:, 0].tolist())
    return write_atomically(out, lambda temporary: figure.save(temporary, format="PNG"))


def format_attention(result: WordRegionAttention) -> str:
    """A table: one line per word, its attention to the whole image and to each box."""
    shown = f"layer {result.layer} of {result.layers}" if result.layer is not None else f"mean of {result.layers} layers"
    header = "\t".join(["word", "image", *(f"#{j}" for j in range(1, len(result.boxes) + 1))])
    rows = ["\t".join([word, *(f"{value:.3f}" for value in row)]) for word, row in zip(result.words, result.attention)]
    return "\n".join([f"attention of each word to each region ({shown}, heads averaged):", header, *rows])


def attention_map(
    recipe: str | Path,
    bindings: Sequence[str],
    checkpoint: str | Path,
    image_path: str | Path,
    text: str,
    boxes: Optional[str],
    boxes_file: Optional[str | Path],
    out: str | Path,
    layer: str = "all",
    device: str | torch.device = "cpu",
    echo: Echo = print,
) -> WordRegionAttention:
    """`vlblocks attention`: check the output path, read the image and the boxes, compute the
    word-to-region attention and write the picture to `out` (only once everything succeeded)."""
    out = check_output_path(out)
    image = read_image(image_path)
    regions = boxes_for(boxes, boxes_file, image.size)
    result = attention_from_recipe(recipe, bindings, checkpoint, image, str(image_path), text, regions, layer, device, echo)
    write_attention_map(result, image, out)
    return result
