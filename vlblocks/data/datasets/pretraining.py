"""Pre-training data: image-text samples (tokenise, truncate, add the whole-image box, load
pixels) and `pretraining_data`, the builder a recipe names (real Conceptual Captions files, or the
embedded demo)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlblocks.contracts import Echo, Tokenizer
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.datasets.text_corpus import TextCorpusChunks
from vlblocks.data.demo.scenes import DEMO_CLASSES, PRETRAINING_SCENES, DemoScenes, demo_transform, demo_word_groups, write_demo_dataset
from vlblocks.data.errors import DataError
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.formats.records import basic_tokenize
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.flip import flip_boxes, flip_image, flip_words
from vlblocks.data.pipeline.images import ImageTransform, scale_boxes
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

LOG = logging.getLogger("vlblocks.data")


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
        seed: with the epoch and the sample index, seeds the sample's blanking, dropping and
            flip (`sample_random`: new draws each epoch).
        class_columns: pad the detector's class distributions with zero columns to this many
            classes (the demo's 5 classes inside a 1601-way region head); None keeps them.
        flip_probability: share of samples flipped horizontally: pixels and boxes end to end,
            boxes alone with precomputed features (which stay as computed), as the official
            RandomHorizontalFlip does. 0.5 at training time in the official pre-training configs.
        swap_flipped_words: also swap "left" and "right" in a flipped sample's caption. False,
            as the official pre-training datasets leave the caption as it is.
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
        swap_flipped_words: bool = False,
    ) -> None:
        self.reader = reader
        self.class_columns = class_columns
        self.flip_probability = flip_probability
        self.swap_flipped_words = swap_flipped_words
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
        return self.sample(index)

    def item_in_epoch(self, index: int, epoch: int) -> EncodedSample:
        """Sample `index` with the random draws (blank, drop, flip) of `epoch`."""
        return self.sample(index, epoch=epoch)

    def sample(self, index: int, blank_image: Optional[bool] = None, drop_caption: Optional[bool] = None, epoch: int = 0) -> EncodedSample:
        """Sample `index` (with `skip_bad_records`, the next good one); `blank_image` and
        `drop_caption` force the ablation on or off, None draws it with the split's probability."""
        if not self.skip_bad_records:
            return self.encode(self.reader[index], index, blank_image, drop_caption, epoch)
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self.encode(self.reader[position], position, blank_image, drop_caption, epoch)
            except DataError as error:
                self.skipped.append(str(error))
                LOG.warning("skipped bad record (%d so far): %s", len(self.skipped), error)
        raise DataError("every record of the dataset is bad")

    def ablated(self, blank_image: bool = False, drop_caption: bool = False) -> Dataset:
        """This split with every image blanked and/or every caption dropped, and no other
        ablation: what evaluation compares the full split against."""
        return _AblatedSplit(self, blank_image, drop_caption)

    def length(self, index: int) -> int:
        """Caption words + boxes of a record: what a length-bucketing sampler sorts by. From the
        reader's own `length` when it has one (it may skip decoding), else from the record."""
        if hasattr(self.reader, "length"):
            return self.reader.length(index)
        example = self.reader[index]
        return len(example.caption) + len(example.boxes)

    def encode(
        self, example: ImageTextExample, index: int = 0, blank_image: Optional[bool] = None, drop_caption: Optional[bool] = None, epoch: int = 0
    ) -> EncodedSample:
        """One record → `[CLS] caption [SEP]` and the whole-image box + the detector's boxes, cut
        to `max_elements`; the boxes the cut drops travel as `dropped_boxes` (and
        `dropped_features`), because the official code masks regions before it truncates."""
        chance = sample_random(self.seed, epoch, index)
        blank_image = chance.random() < self.blank_image_probability if blank_image is None else blank_image
        drop_caption = chance.random() < self.drop_caption_probability if drop_caption is None else drop_caption
        flip = chance.random() < self.flip_probability
        caption = flip_words(example.caption) if flip and self.swap_flipped_words else example.caption
        pieces, words = encode_caption(self.tokenizer, [] if drop_caption else caption)
        text_length, box_count = truncate_to_budget(len(pieces) + 2, len(example.boxes) + 1, self.max_elements)
        pieces, words = pieces[: text_length - 2], words[: text_length - 2]
        text_ids = np.asarray([self.tokenizer.cls_id, *pieces, self.tokenizer.sep_id], dtype=np.int64)
        word_index = np.asarray([-1, *words, -1], dtype=np.int64)

        scores = example.class_scores[: box_count - 1].astype(np.float32)
        if self.class_columns is not None and scores.shape[1] < self.class_columns:
            scores = np.pad(scores, ((0, 0), (0, self.class_columns - scores.shape[1])))
        if self.image_transform is None:
            boxes, features, image_size = self.precomputed_regions(example, flip, blank_image)
            image, pixels = None, {}
        else:
            boxes, image, pixels = self.pixel_regions(example, flip, blank_image)
            features, image_size = None, (image.shape[2], image.shape[1])
        return EncodedSample(
            text_ids=text_ids,
            word_index=word_index,
            boxes=boxes[:box_count],
            class_scores=np.concatenate([np.zeros((1, scores.shape[1]), np.float32), scores]),
            features=features[:box_count] if features is not None else None,
            image=image,
            image_size=image_size,
            dropped_boxes=boxes[box_count:],
            dropped_features=features[box_count:] if features is not None else None,
            **pixels,
        )

    def precomputed_regions(self, example: ImageTextExample, flip: bool, blank_image: bool) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """All N + 1 boxes [N + 1, 4] in the original image's pixels (the whole image first,
        mirrored when `flip`) and their features [N + 1, D] (region 0: the mean of the file's N;
        zeros when `blank_image`), with the image's (width, height).

        The official code flips precomputed boxes too (its features stay as computed), in the
        frame of the resized image; here they are mirrored in the original image's frame, which
        shifts a normalised x by 1/width_resized - 1/width_original (under a pixel)."""
        if example.features is None:
            raise ValueError(f"{example.record}: no precomputed features, and the recipe reads no images")
        width, height = example.image_width, example.image_height
        boxes = np.concatenate([whole_image_box(width, height), example.boxes]).astype(np.float32)
        if flip:
            boxes = flip_boxes(boxes, width)
        whole = example.features.mean(0, keepdims=True)  # over all boxes in the file, before truncation
        features = np.concatenate([whole, example.features]).astype(np.float32)
        return boxes, np.zeros_like(features) if blank_image else features, (width, height)

    def pixel_regions(self, example: ImageTextExample, flip: bool, blank_image: bool) -> tuple[np.ndarray, torch.Tensor, dict]:
        """All N + 1 boxes [N + 1, 4] in the resized image's pixels, the whole image
        [0, 0, w0 - 1, h0 - 1] first and scaled with the others as the official transform does
        (then clamped, then mirrored when `flip`), the uint8 pixels [3, H, W] (zeros when
        `blank_image`) and the fields that normalise them."""
        if example.load_image is None:
            raise ValueError(f"{example.record}: the recipe computes features from pixels, but the record has no image")
        picture = example.load_image()
        image, scale = self.image_transform.pixels(picture)
        width, height = image.shape[2], image.shape[1]
        boxes = np.concatenate([whole_image_box(*picture.size), example.boxes]).astype(np.float32)
        boxes = scale_boxes(boxes, scale, width, height)
        if flip:
            image, boxes = flip_image(image), flip_boxes(boxes, width)
        if blank_image:  # no real pixels: all of it is 0 (the mean colour) once normalised
            image = torch.zeros_like(image)
        pixels = {"pixel_normalization": self.image_transform.normalization(), "image_extent": (0, 0) if blank_image else None}
        return boxes, image, pixels


def whole_image_box(width: int, height: int) -> np.ndarray:
    """[1, 4] float32: the box of a whole `width` x `height` image, (0, 0, width - 1, height - 1)."""
    return np.asarray([[0.0, 0.0, width - 1.0, height - 1.0]], dtype=np.float32)


def encode_caption(tokenizer: Tokenizer, caption: Sequence[str]) -> tuple[list[int], list[int]]:
    """The official caption encoding: BERT's basic tokenisation of the words joined by spaces
    (lower-cased, punctuation split off), then WordPiece per basic token. Returns the piece ids
    [T] and, per piece, the index of its basic token: the unit whole-word masking masks, so
    "dog," is two units, "dog" and ","."""
    return tokenizer.encode_words(basic_tokenize(" ".join(caption)))


class _AblatedSplit(Dataset):
    """`PretrainingDataset.ablated`: the same samples with the ablations forced."""

    def __init__(self, dataset: PretrainingDataset, blank_image: bool, drop_caption: bool) -> None:
        self.dataset = dataset
        self.blank_image = blank_image
        self.drop_caption = drop_caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.dataset.sample(index, self.blank_image, self.drop_caption)


@dataclass
class PretrainingData(RunData):
    """`RunData` of pre-training: `PretrainingDataset` splits and the text-only corpus stream."""

    def fit_region_classes(self, columns: int, echo: Echo) -> None:
        """The demo detector's classes fill the first columns of a wider region head (e.g. the
        base recipe's 1601-way one); real detectors' distributions stay as they are."""
        if self.is_demo and columns > len(DEMO_CLASSES):
            echo(f"the demo detector has {len(DEMO_CLASSES)} classes; they fill the first columns of the {columns}-way region head")
            self.train.class_columns = self.val.class_columns = columns


def pretraining_data(
    train_annotations: Optional[str] = None,
    val_annotations: Optional[str] = None,
    corpus: Optional[str] = None,
    vocab: Optional[str] = None,
    image_transform: Optional[ImageTransform] = None,
    max_elements: int = 64,
    text_chunk_length: int = 64,
    blank_image_probability: float = 0.0,
    drop_caption_probability: float = 0.0,
    flip_probability: float = 0.0,
    skip_bad_records: bool = False,
    swap_flipped_words: bool = False,
    demo: DemoScenes = DemoScenes(),
    seed: int = 0,
) -> PretrainingData:
    """Build the pre-training datasets.

    With `train_annotations` unset, the embedded demo dataset is generated (once, cached in
    `demo.directory`) in the Conceptual Captions layout and read back through the same reader,
    tokenizer and image pipeline as real data.

    Args:
        train_annotations, val_annotations: Conceptual Captions `{train,val}_frcnn.json` files.
        corpus: text-only corpus, one paragraph per line (None: no text-only stream).
        vocab: WordPiece `vocab.txt` (bert-base-uncased's for real pre-training); the demo
            trains its own when unset.
        image_transform: end-to-end pixels when given; None reads precomputed features.
        max_elements, text_chunk_length: 64 and 64 in VL-BERT.
        blank_image_probability, drop_caption_probability, flip_probability: see
            `PretrainingDataset` (training split only; the recipes flip half the samples).
        swap_flipped_words: see `PretrainingDataset` (False: the official behaviour).
        skip_bad_records: count, log and skip malformed records instead of stopping at the first.
        demo: where, how many (`PRETRAINING_SCENES` where unset) and how large the demo scenes
            are when `train_annotations` is unset; they are read at their drawn size (the transform's resize is replaced, its
            normalisation kept).
        seed: seeds the per-sample blanking and dropping.
    """
    is_demo = train_annotations is None
    if is_demo:
        demo = demo.sized(PRETRAINING_SCENES)
        paths = write_demo_dataset(
            Path(demo.directory).expanduser(), train=demo.train, val=demo.val, seed=demo.seed, image_size=demo.image_size
        )
        train_annotations, val_annotations = str(paths.train), str(paths.val)
        corpus = corpus if corpus is not None else str(paths.corpus)
        vocab = vocab if vocab is not None else str(paths.vocab)
        if image_transform is not None:
            image_transform = demo_transform(image_transform, demo.image_size)
        description = (
            f"no data configured: training on the embedded demo dataset ({demo.train} train / {demo.val} val scenes "
            f"in {paths.root}). Point the recipe at real data with "
            "--bind \"pretraining_data.train_annotations = '/data/conceptual-captions/train_frcnn.json'\" "
            "(and val_annotations, corpus, vocab). To watch a small model learn on the demo data in a few minutes, "
            "train recipes/demo/vlbert_demo.gin."
        )
    else:
        if vocab is None:
            raise ValueError("pretraining_data.vocab is unset: give the WordPiece vocab.txt (e.g. bert-base-uncased's)")
        if val_annotations is None:
            raise ValueError("pretraining_data.val_annotations is unset: give the validation split's annotation file")
        description = f"training on {train_annotations} (validation: {val_annotations})"
    tokenizer = WordPieceTokenizer(Path(vocab))
    datasets = [
        PretrainingDataset(
            ConceptualCaptionsReader(path),
            tokenizer,
            image_transform,
            max_elements,
            blank_image_probability if split == "train" else 0.0,
            drop_caption_probability if split == "train" else 0.0,
            seed,
            flip_probability=flip_probability if split == "train" else 0.0,
            skip_bad_records=skip_bad_records,
            swap_flipped_words=swap_flipped_words,
        )
        for split, path in (("train", train_annotations), ("val", val_annotations))
    ]
    text = TextCorpusChunks(corpus, tokenizer, text_chunk_length) if corpus is not None else None
    return PretrainingData(
        train=datasets[0],
        val=datasets[1],
        tokenizer=tokenizer,
        description=description,
        collate=collate_pretraining,
        is_demo=is_demo,
        text=text,
        word_groups=demo_word_groups(tokenizer) if is_demo else None,
    )
