"""Where pre-training data comes from: real Conceptual Captions files, or the embedded demo."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from vlblocks.batch import VLBatch
from vlblocks.data.collate import collate_pretraining

from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.images import ImageTransform
from vlblocks.data.pretraining import PretrainingDataset
from vlblocks.data.synthetic import write_demo_dataset
from vlblocks.data.text_corpus import TextCorpusChunks
from vlblocks.data.wordpiece import WordPieceTokenizer

DEFAULT_DEMO_DIRECTORY = "~/.cache/vlblocks/demo"


@dataclass
class PretrainingData:
    """The datasets a pre-training run reads, a sentence saying what they are, and how to batch them."""

    train: PretrainingDataset
    val: PretrainingDataset
    text: Optional[TextCorpusChunks]
    tokenizer: WordPieceTokenizer
    is_demo: bool
    description: str
    collate: Callable[[list], VLBatch] = collate_pretraining


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
    demo_directory: str = DEFAULT_DEMO_DIRECTORY,
    demo_train: int = 4000,
    demo_val: int = 500,
    demo_seed: int = 0,
    demo_image_size: int = 64,
    seed: int = 0,
) -> PretrainingData:
    """Build the pre-training datasets.

    With `train_annotations` unset, the embedded demo dataset is generated (once, cached in
    `demo_directory`) in the Conceptual Captions layout and read back through the same reader,
    tokenizer and image pipeline as real data.

    Args:
        train_annotations, val_annotations: Conceptual Captions `{train,val}_frcnn.json` files.
        corpus: text-only corpus, one paragraph per line (None: no text-only stream).
        vocab: WordPiece `vocab.txt` (bert-base-uncased's for real pre-training); the demo
            trains its own when unset.
        image_transform: end-to-end pixels when given; None reads precomputed features.
        max_elements, text_chunk_length: 64 and 64 in VL-BERT.
        blank_image_probability, drop_caption_probability, flip_probability: see
            `PretrainingDataset` (training split only).
        skip_bad_records: count, log and skip malformed records instead of stopping at the first.
        demo_*: size, seed and image size of the generated demo dataset; demo images are
            read at their drawn size (the transform's resize is replaced, its normalisation kept).
        seed: seeds the per-sample blanking and dropping.
    """
    is_demo = train_annotations is None
    if is_demo:
        paths = write_demo_dataset(
            Path(demo_directory).expanduser(), train=demo_train, val=demo_val, seed=demo_seed, image_size=demo_image_size
        )
        train_annotations, val_annotations = str(paths.train), str(paths.val)
        corpus = corpus if corpus is not None else str(paths.corpus)
        vocab = vocab if vocab is not None else str(paths.vocab)
        if image_transform is not None:  # the scenes are drawn at their final size: no upscaling
            image_transform = replace(image_transform, shorter_side=demo_image_size, longer_side=demo_image_size)
        description = (
            f"no data configured: training on the embedded demo dataset ({demo_train} train / {demo_val} val scenes "
            f"in {paths.root}). Point the recipe at real data with "
            "--bind \"pretraining_data.train_annotations = '/data/conceptual-captions/train_frcnn.json'\" "
            "(and val_annotations, corpus, vocab). To watch a small model learn on the demo data in a minute, "
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
        )
        for split, path in (("train", train_annotations), ("val", val_annotations))
    ]
    text = TextCorpusChunks(corpus, tokenizer, text_chunk_length) if corpus is not None else None
    return PretrainingData(datasets[0], datasets[1], text, tokenizer, is_demo, description)
