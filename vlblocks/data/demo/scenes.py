"""The embedded demo dataset: small drawn scenes of coloured shapes with grounded captions.

Each scene is a canvas (default 64x64) with 2 or 3 non-overlapping shapes (circle, square,
triangle, diamond) in one of six colours and two sizes. Captions state counts, colours, shapes,
sizes and spatial relations that are true for the scene, so predicting those words needs the
image. Boxes are the exact pixel extents of the drawn shapes, and each box gets a soft,
detector-like class distribution over `DEMO_CLASSES` peaked on its true shape. There are no
region features: in the demo they come from the pixels through the model's backbone.

Everything is deterministic in the seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from vlblocks.contracts import Tokenizer
from vlblocks.data.formats.conceptual_captions import CaptionRecord, write_conceptual_captions
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.wordpiece import train_wordpiece_vocab

FORMAT_VERSION = 1
DEFAULT_DEMO_DIRECTORY = "~/.cache/vlblocks/demo"
DEMO_CLASSES: list[str] = ["__background__", "circle", "square", "triangle", "diamond"]
SHAPES: list[str] = DEMO_CLASSES[1:]
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
}
SIZES: list[str] = ["small", "large"]
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
VISUAL_WORDS: dict[str, set[str]] = {
    "colour": set(COLOUR_RGB),
    "shape": set(SHAPES),
    "relation": {"left", "right", "above", "below"},
    "size": set(SIZES),
    "count": set(NUMBER_WORDS.values()),
}

# Side lengths in pixels at 64x64, scaled with the canvas.
_SIDE_RANGE = {"small": (10, 14), "large": (18, 24)}
_GAP = 2  # minimum pixels between two shapes' boxes, so every pair has a clear relation
_MARGIN = 1  # minimum pixels between a shape and the canvas edge
_NOISE = 5  # background noise amplitude per channel; the background never matches a colour
_CORPUS_PARAGRAPHS = 2000
_VOCAB_SIZE = 1000
# Seed streams: the splits and the corpus draw from independent random sequences.
_TRAIN_STREAM, _VAL_STREAM, _CORPUS_STREAM = 0, 1, 2


@dataclass
class Scene:
    """One generated scene.

    Attributes:
        image: PNG bytes of the [image_size, image_size] RGB canvas.
        caption: lower-case, basic-tokenised words (punctuation as separate tokens).
        boxes: [N, 4] float32 (x1, y1, x2, y2) pixel-edge boxes: the shape covers pixel columns
            x1 .. x2 - 1 and rows y1 .. y2 - 1, touching all four sides.
        class_scores: [N, 5] float32 distributions over DEMO_CLASSES (rows sum to 1).
        shapes, colours, sizes: per box, its shape, colour and size words.
    """

    image: bytes
    caption: list[str]
    boxes: np.ndarray
    class_scores: np.ndarray
    shapes: list[str]
    colours: list[str]
    sizes: list[str]


@dataclass(frozen=True)
class DemoScenes:
    """How much of the embedded demo a data builder writes and reads when its recipe configures
    no data: where (`directory`, shared by every task's demo), how many scenes per split
    (None: the builder's own default, `PRETRAINING_SCENES` or `TASK_SCENES`), their seed and
    their size in pixels. Every recipe can bind it, e.g. `DemoScenes.train = 240`."""

    directory: str = DEFAULT_DEMO_DIRECTORY
    train: Optional[int] = None
    val: Optional[int] = None
    seed: int = 0
    image_size: int = 64

    def sized(self, default: tuple[int, int]) -> DemoScenes:
        """These settings with the (train, val) scene counts of `default` where they are None."""
        train = self.train if self.train is not None else default[0]
        return replace(self, train=train, val=self.val if self.val is not None else default[1])


PRETRAINING_SCENES = (4000, 500)  # (train, val) scenes of the pre-training demo
TASK_SCENES = (2000, 300)  # and of each fine-tuning task's demo


@dataclass
class DemoPaths:
    """Where `write_demo_dataset` put things (annotation files for the splits)."""

    root: Path
    train: Path
    val: Path
    corpus: Path
    vocab: Path


@dataclass
class _Layout:
    shapes: list[str]
    colours: list[str]
    sizes: list[str]
    masks: list[Image.Image]  # per shape, an "L" mask of the canvas size
    boxes: np.ndarray  # [N, 4] float32


def generate_scenes(count: int, seed: int, image_size: int = 64, stream: int = 0) -> list[Scene]:
    """Draws `count` scenes; scene i depends only on (seed, stream, i)."""
    return [_scene(np.random.default_rng([seed, stream, i]), image_size) for i in range(count)]


def generate_corpus(paragraphs: int, seed: int, image_size: int = 64) -> list[str]:
    """Text-only paragraphs of scene descriptions (2 to 4 imagined scenes each), one string each."""
    lines = []
    for i in range(paragraphs):
        rng = np.random.default_rng([seed, _CORPUS_STREAM, i])
        words: list[str] = []
        for _ in range(int(rng.integers(2, 5))):
            words += _describe(_sample_layout(rng, image_size), rng)
        lines.append(" ".join(words))
    return lines


def write_demo_dataset(
    directory: Path,
    train: int = PRETRAINING_SCENES[0],
    val: int = PRETRAINING_SCENES[1],
    seed: int = 0,
    image_size: int = 64,
) -> DemoPaths:
    """Writes the demo dataset, or returns at once if `directory` already holds the same one.

    Writes `train_*` and `val_*` files in the Conceptual Captions layout, `corpus.txt` (one
    paragraph per line), `vocab.txt` (WordPiece trained on the train captions and the corpus)
    and `manifest.json` (the arguments and format version; written last, so an interrupted run
    is regenerated next time).
    """
    directory = Path(directory)
    paths = DemoPaths(
        root=directory,
        train=directory / "train_frcnn.json",
        val=directory / "val_frcnn.json",
        corpus=directory / "corpus.txt",
        vocab=directory / "vocab.txt",
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "train": train,
        "val": val,
        "seed": seed,
        "image_size": image_size,
        "corpus_paragraphs": _CORPUS_PARAGRAPHS,
        "vocab_size": _VOCAB_SIZE,
    }
    manifest_path = directory / "manifest.json"
    if manifest_matches(manifest_path, manifest, [paths.train, paths.val, paths.corpus, paths.vocab]):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    train_scenes = generate_scenes(train, seed, image_size, stream=_TRAIN_STREAM)
    write_conceptual_captions(directory, "train", _records(train_scenes))
    write_conceptual_captions(
        directory, "val", _records(generate_scenes(val, seed, image_size, stream=_VAL_STREAM))
    )
    corpus = generate_corpus(_CORPUS_PARAGRAPHS, seed, image_size)
    paths.corpus.write_text("".join(line + "\n" for line in corpus), encoding="utf-8")
    captions = (" ".join(scene.caption) for scene in train_scenes)
    train_wordpiece_vocab(itertools.chain(captions, corpus), paths.vocab, vocab_size=_VOCAB_SIZE)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


def demo_vocabulary(directory: Path, seed: int = 0, image_size: int = 64) -> Path:
    """The WordPiece vocabulary of the pre-training demo in `directory`, whatever its scene
    counts (a run may have bound `DemoScenes.train`); the default-sized demo is written first when
    `directory` holds none of this seed and image size. Rewriting a smaller demo at the default
    size would change the vocabulary under a model already trained with it."""
    directory = Path(directory)
    expected = {"format_version": FORMAT_VERSION, "seed": seed, "image_size": image_size,
                "corpus_paragraphs": _CORPUS_PARAGRAPHS, "vocab_size": _VOCAB_SIZE}
    existing = read_manifest(directory / "manifest.json")
    vocab = directory / "vocab.txt"
    if all(existing.get(key) == value for key, value in expected.items()) and vocab.is_file():
        return vocab
    return write_demo_dataset(directory, seed=seed, image_size=image_size).vocab


def read_manifest(manifest_path: Path) -> dict:
    """A demo writer's manifest, or {} when there is none (or it is unreadable)."""
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def manifest_matches(manifest_path: Path, manifest: dict, needed: list[Path]) -> bool:
    """True when `manifest_path` holds `manifest` and every needed file exists: what a demo
    writer has already written (its manifest is written last, so an interrupted write is redone)."""
    return read_manifest(manifest_path) == manifest and all(path.is_file() for path in needed)


def demo_transform(transform: Optional[ImageTransform], image_size: int) -> ImageTransform:
    """The recipe's image transform (or the default one) with its resize set to the demo scenes'
    drawn size: they are read as drawn, never upscaled; the normalisation is the recipe's."""
    return replace(transform if transform is not None else ImageTransform(), shorter_side=image_size, longer_side=image_size)


def _records(scenes: list[Scene]) -> Iterator[CaptionRecord]:
    for scene in scenes:
        yield scene.caption, scene.image, scene.boxes, scene.class_scores, None


def _scene(rng: np.random.Generator, image_size: int) -> Scene:
    layout = _sample_layout(rng, image_size)
    canvas = _background(rng, image_size)
    for colour, mask in zip(layout.colours, layout.masks):
        canvas.paste(COLOUR_RGB[colour], mask=mask)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return Scene(
        image=buffer.getvalue(),
        caption=_describe(layout, rng),
        boxes=layout.boxes,
        class_scores=_class_scores(rng, layout.shapes),
        shapes=layout.shapes,
        colours=layout.colours,
        sizes=layout.sizes,
    )


def _background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """Light grey or a random pale colour, with mild per-pixel noise; every channel >= 195."""
    if rng.random() < 0.5:
        base = np.full(3, rng.integers(205, 236))
    else:
        base = rng.integers(205, 246, size=3)
    noise = rng.integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _sample_layout(rng: np.random.Generator, image_size: int) -> _Layout:
    """Picks 2 or 3 shapes with distinct (colour, shape) pairs and places them apart."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    scale = image_size / 64
    while True:
        count = int(rng.integers(2, 4))
        kinds: list[tuple[str, str]] = []
        while len(kinds) < count:
            kind = (SHAPES[rng.integers(len(SHAPES))], list(COLOUR_RGB)[rng.integers(len(COLOUR_RGB))])
            if kind not in kinds:
                kinds.append(kind)
        sizes = [SIZES[rng.integers(2)] for _ in range(count)]
        sides = [
            int(round(rng.integers(low, high + 1) * scale)) for low, high in (_SIDE_RANGE[s] for s in sizes)
        ]
        squares = _place(rng, sides, image_size)
        if squares is not None:
            break
    masks = [_mask(shape, square, image_size) for (shape, _), square in zip(kinds, squares)]
    boxes = np.asarray([mask.getbbox() for mask in masks], dtype=np.float32)
    return _Layout(
        shapes=[shape for shape, _ in kinds],
        colours=[colour for _, colour in kinds],
        sizes=sizes,
        masks=masks,
        boxes=boxes,
    )


def _place(
    rng: np.random.Generator, sides: list[int], image_size: int, tries: int = 50
) -> list[tuple[int, int, int]] | None:
    """Top-left corners for squares of the given sides, pairwise at least _GAP apart, or None."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        high = image_size - side - _MARGIN
        for _ in range(tries):
            x, y = (int(v) for v in rng.integers(_MARGIN, high + 1, size=2))
            if all(_apart((x, y, side), other) for other in placed):
                placed.append((x, y, side))
                break
        else:
            return None
    return placed


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, a_side), (bx, by, b_side) = a, b
    return (
        ax + a_side + _GAP <= bx
        or bx + b_side + _GAP <= ax
        or ay + a_side + _GAP <= by
        or by + b_side + _GAP <= ay
    )


def _mask(shape: str, square: tuple[int, int, int], image_size: int) -> Image.Image:
    """A binary mask of one shape inscribed in the square (x, y, side)."""
    x, y, side = square
    last = side - 1
    mid = last // 2
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([x, y, x + last, y + last], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, x + last, y + last], fill=255)
    elif shape == "triangle":
        draw.polygon([(x + mid, y), (x + last, y + last), (x, y + last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(x + mid, y), (x + last, y + mid), (x + mid, y + last), (x, y + mid)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _class_scores(rng: np.random.Generator, shapes: list[str]) -> np.ndarray:
    """[N, 5] detector-like distributions: 0.7-0.9 on the true class, the rest spread randomly."""
    count, classes = len(shapes), len(DEMO_CLASSES)
    true_class = np.asarray([DEMO_CLASSES.index(shape) for shape in shapes])
    peak = rng.uniform(0.7, 0.9, size=count)
    rest = rng.dirichlet(np.ones(classes - 1), size=count) * (1.0 - peak)[:, None]  # [N, C - 1]
    scores = np.empty((count, classes))
    is_true = np.arange(classes)[None, :] == true_class[:, None]  # [N, C]
    scores[is_true] = peak
    scores[~is_true] = rest.reshape(-1)
    return (scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- captions


def _describe(layout: _Layout, rng: np.random.Generator) -> list[str]:
    """A caption whose every claim (counts, colours, shapes, sizes, relations) holds for the layout."""
    count = len(layout.shapes)
    order = [int(i) for i in rng.permutation(count)]
    sentences: list[list[str]] = []
    if count == 2:
        template = int(rng.integers(3))
        if template == 0:
            sentences += [_count_sentence(rng, count), _relation(rng, layout, order[0], order[1])]
        elif template == 1:
            sentences += [_relation(rng, layout, order[0], order[1])]
        else:
            sentences += [_list_sentence(rng, layout, order), _relation(rng, layout, order[0], order[1])]
    else:
        template = int(rng.integers(3))
        third_partner = order[int(rng.integers(2))]
        if template == 0:
            sentences += [
                _count_sentence(rng, count),
                _relation(rng, layout, order[0], order[1]),
                _relation(rng, layout, order[2], third_partner),
            ]
        elif template == 1:
            sentences += [_list_sentence(rng, layout, order), _relation(rng, layout, order[0], order[1])]
        else:
            sentences += [
                _relation(rng, layout, order[0], order[1]),
                _relation(rng, layout, order[2], third_partner),
            ]
    if rng.random() < 0.3:
        colour = layout.colours[int(rng.integers(count))]
        sentences.append(_colour_count_sentence(colour, layout.colours.count(colour)))
    return [word for sentence in sentences for word in sentence + ["."]]


def _noun_phrase(rng: np.random.Generator, layout: _Layout, index: int) -> list[str]:
    """'a [size] colour shape' (or 'the ...'); (colour, shape) is unique within a scene."""
    words = [layout.sizes[index]] if rng.random() < 0.6 else []
    words += [layout.colours[index], layout.shapes[index]]
    if rng.random() < 0.3:
        return ["the"] + words
    return ["an" if words[0][0] in "aeiou" else "a"] + words


def _count_sentence(rng: np.random.Generator, count: int) -> list[str]:
    number = NUMBER_WORDS[count]
    noun = "shape" if count == 1 else "shapes"
    verb = "is" if count == 1 else "are"
    options = [
        ["there", verb, number, noun],
        ["i", "see", number, noun],
        ["the", "image", "shows", number, noun],
    ]
    return options[int(rng.integers(len(options)))]


def _colour_count_sentence(colour: str, count: int) -> list[str]:
    number = NUMBER_WORDS[count]
    noun = "shape" if count == 1 else "shapes"
    verb = "is" if count == 1 else "are"
    return ["there", verb, number, colour, noun]


def _list_sentence(rng: np.random.Generator, layout: _Layout, order: list[int]) -> list[str]:
    phrases = [_noun_phrase(rng, layout, i) for i in order]
    listed = phrases[0]
    for phrase in phrases[1:-1]:
        listed = listed + [","] + phrase
    listed = listed + ["and"] + phrases[-1]
    if rng.random() < 0.5:
        return ["the", "shapes", "are"] + listed
    return ["there", "are", NUMBER_WORDS[len(order)], "shapes", ":"] + listed


def _relation(rng: np.random.Generator, layout: _Layout, a: int, b: int) -> list[str]:
    """'A is <relation> B' with a relation chosen among those true for the two boxes."""
    relations = _true_relations(layout.boxes[a], layout.boxes[b])
    relation = relations[int(rng.integers(len(relations)))]
    if relation in ("left", "right"):
        words = ["to", "the", relation, "of"] if rng.random() < 0.3 else [relation, "of"]
    else:
        words = [relation]
    return _noun_phrase(rng, layout, a) + ["is"] + words + _noun_phrase(rng, layout, b)


def _true_relations(a: np.ndarray, b: np.ndarray) -> list[str]:
    """Relations of box a to box b along axes where the boxes are separated (so the centres agree)."""
    relations = []
    if a[2] <= b[0]:
        relations.append("left")
    if b[2] <= a[0]:
        relations.append("right")
    if a[3] <= b[1]:
        relations.append("above")
    if b[3] <= a[1]:
        relations.append("below")
    return relations


def demo_word_groups(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Token ids of the demo's colour, shape and relation words that are single WordPieces
    (evaluation reports the masked-word accuracy of each group on its own)."""
    groups = {}
    for group in ("colour", "shape", "relation"):
        ids = []
        for word in VISUAL_WORDS[group]:
            pieces, _ = tokenizer.encode_words([word])
            if len(pieces) == 1:
                ids.append(pieces[0])
        groups[group] = ids
    return groups
