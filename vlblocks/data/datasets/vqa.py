"""VQA v2 fine-tuning samples: `[CLS] question [SEP] [MASK] [SEP]` over precomputed region features."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from vlblocks.contracts import Tokenizer
from vlblocks.data.datasets.run_data import RunData, existing_file
from vlblocks.data.demo.scenes import DemoScenes
from vlblocks.data.demo.task_data import demo_description, write_demo_task
from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import RegionFeatures, read_feature_json
from vlblocks.data.formats.feature_store import FeatureStore
from vlblocks.data.formats.vqa import VQAQuestion, VQAReader
from vlblocks.data.formats.vqa_answers import (
    answer_targets,
    normalize_training_answer,
    read_answer_vocabulary,
    vocabulary_index,
    vocabulary_keys,
)
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.flip import SWAPPED_WORDS, flip_boxes
from vlblocks.data.pipeline.images import scale_boxes
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

FeatureSource = Callable[[int], RegionFeatures]


class FeatureDirectory:
    """Per-image VL-BERT feature files, `<directory>/<image_id>.json` (read on demand).

    Call: image id → `RegionFeatures`. Raises `DataError` naming the file when it is missing or bad.
    """

    def __init__(self, directory: str | Path, name_format: str = "{image_id}.json") -> None:
        self.directory = Path(directory)
        self.name_format = name_format

    def __call__(self, image_id: int) -> RegionFeatures:
        return read_feature_json(self.directory / self.name_format.format(image_id=image_id))


def feature_source(path: str | Path) -> FeatureSource:
    """A packed `FeatureStore` when `path` holds one (`vlblocks data pack`), else per-image json files."""
    path = Path(path)
    if (path / "index.json").is_file():
        store = FeatureStore(path)
        return lambda image_id: store[image_id]
    return FeatureDirectory(path)


class VQADataset(Dataset):
    """VL-BERT's VQA input: `[CLS] question [SEP] [MASK] [SEP]`, the [MASK] and last [SEP] in
    segment B, every token seeing the whole image; the regions are the whole-image box then
    every detected box of the feature file (VL-BERT's adaptive 10-100).

    The whole-image feature is the file's `image_box_feature` when it has one, else the mean of
    its region features. Boxes stay in the original image's pixels and are clamped to it.

    A flipped sample (VL-BERT's training-time horizontal flip) has its boxes mirrored, the
    question pieces "left" and "right" swapped, and the same words swapped in every human answer
    before the targets are built, so "left" scores as "right". The region features stay those of
    the unflipped image, as in VL-BERT with precomputed features.

    Args:
        reader: `VQAReader` (annotations give `answer_scores`; a test split gives None).
        features: image id → `RegionFeatures` (`FeatureDirectory` or a packed store).
        tokenizer: WordPiece tokenizer.
        answers: the answer vocabulary in classifier order, as VL-BERT matches it
            (`vocabulary_keys` of `answers_vqa.txt`).
        max_question_pieces: keep at most this many question pieces (None: all).
        seed: with the sample index, draws whether a sample is flipped (the same each epoch).
        flip_probability: share of samples flipped (VL-BERT: 0.5 for training, 0 otherwise).
        index_offset: added to the index for the draw (this split's start in a concatenation).
        normalize_answers: match `normalize_training_answer` of each human answer instead of
            the raw string (bottom-up-attention's targets; VL-BERT matches raw strings).
    """

    def __init__(
        self, reader: Sequence[VQAQuestion], features: FeatureSource, tokenizer: Tokenizer, answers: Sequence[str],
        max_question_pieces: Optional[int] = None, seed: int = 0, flip_probability: float = 0.0,
        index_offset: int = 0, normalize_answers: bool = False,
    ) -> None:
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"VQADataset.flip_probability must be in [0, 1], got {flip_probability}")
        self.reader = reader
        self.features = features
        self.tokenizer = tokenizer
        self.answer_index = vocabulary_index(answers)
        self.max_question_pieces = max_question_pieces
        self.seed = seed
        self.flip_probability = flip_probability
        self.index_offset = index_offset
        self.normalize = normalize_training_answer if normalize_answers else None
        self.swapped_pieces = _swapped_pieces(tokenizer)
        self.skip_bad_records = False
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.reader)

    def length(self, index: int) -> int:
        return len(self.reader[index].question_tokens)

    def flipped(self, index: int, epoch: int = 0) -> bool:
        """Whether sample `index` is flipped in `epoch` (`sample_random` of the seed, the epoch
        and the index plus `index_offset`)."""
        return sample_random(self.seed, epoch, self.index_offset + index).random() < self.flip_probability

    def __getitem__(self, index: int) -> EncodedSample:
        return self.item_in_epoch(index, 0)

    def item_in_epoch(self, index: int, epoch: int) -> EncodedSample:
        """Sample `index` with the flip draw of `epoch`."""
        question = self.reader[index]
        flip = self.flipped(index, epoch)
        pieces, words = self.tokenizer.encode_words(question.question_tokens)
        if flip:
            pieces = [self.swapped_pieces.get(piece, piece) for piece in pieces]
        if self.max_question_pieces is not None:
            pieces, words = pieces[: self.max_question_pieces], words[: self.max_question_pieces]
        text_ids = np.asarray([self.tokenizer.cls_id, *pieces, self.tokenizer.sep_id, self.tokenizer.mask_id, self.tokenizer.sep_id], np.int64)
        segment_ids = np.asarray([0] * (len(pieces) + 2) + [1, 1], np.int64)
        regions = self.features(question.image_id)
        if regions.features.ndim != 2 or len(regions.boxes) != len(regions.features):
            raise DataError(f"{regions.record}: boxes and features disagree for image_id {question.image_id}")
        whole_feature = regions.image_box_feature if regions.image_box_feature is not None else regions.features.mean(0)
        width, height = regions.image_width, regions.image_height
        whole_box = np.asarray([[0.0, 0.0, width - 1.0, height - 1.0]], np.float32)
        boxes = np.concatenate([whole_box, regions.boxes.astype(np.float32)])
        if flip:
            boxes = flip_boxes(boxes, width)
        boxes = scale_boxes(boxes, (1.0, 1.0), width, height)  # VL-BERT clamps every box to the image
        scores = None
        if question.answers is not None:
            answers = [flip_answer(answer) for answer in question.answers] if flip else question.answers
            scores = answer_targets(answers, self.answer_index, self.normalize)
        return EncodedSample(
            text_ids=text_ids,
            word_index=np.asarray([-1, *words, -1, -1, -1], np.int64),
            boxes=boxes,
            class_scores=None,
            features=np.concatenate([whole_feature[None], regions.features]).astype(np.float32),
            image=None,
            image_size=(width, height),
            segment_ids=segment_ids,
            answer_position=len(pieces) + 2,
            answer_scores=scores,
        )


def flip_answer(answer: str) -> str:
    """The answer's words "left" and "right" swapped: split on single spaces, exact
    (case-sensitive) matches only, as VL-BERT's VQA dataset flips answers."""
    return " ".join(SWAPPED_WORDS.get(word, word) for word in answer.split(" "))


def _swapped_pieces(tokenizer: Tokenizer) -> dict[int, int]:
    """The ids of the single pieces "left" and "right", each mapped to the other; empty when the
    vocabulary lacks either as one piece (VL-BERT swaps these two WordPiece tokens)."""
    left, _ = tokenizer.encode_words(["left"])
    right, _ = tokenizer.encode_words(["right"])
    unknown = getattr(tokenizer, "unk_id", None)
    if len(left) != 1 or len(right) != 1 or unknown in (left[0], right[0]):
        return {}
    return {left[0]: right[0], right[0]: left[0]}


class _TrainSplits(ConcatDataset):
    """Several training splits read as one, each sample with the flip draw of its epoch."""

    def item_in_epoch(self, index: int, epoch: int) -> EncodedSample:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[part - 1] if part > 0 else 0
        return self.datasets[part].item_in_epoch(index - start, epoch)


def vqa_data(
    root: Optional[str] = None,
    train_splits: Sequence[str] = ("train2014",),
    val_split: str = "val2014",
    answers: str = "vqa/answers_vqa.txt",
    features: str = "vgbua_res101_precomputed/trainval2014_resnet101_faster_rcnn_genome",
    vocab: Optional[str] = None,
    max_question_pieces: Optional[int] = None,
    flip_probability: float = 0.5,
    seed: int = 0,
    normalize_answers: bool = False,
    demo: DemoScenes = DemoScenes(),
) -> RunData:
    """VQA v2 laid out as VL-BERT's `data/coco`:

        <root>/vqa/v2_OpenEnded_mscoco_<split>_questions.json
        <root>/vqa/v2_mscoco_<split>_annotations.json        (not for test2015)
        <root>/vqa/answers_vqa.txt                            (the 3,129 answers)
        <root>/vgbua_res101_precomputed/trainval2014_resnet101_faster_rcnn_genome/<image_id>.json

    `features` may also be a store packed with `vlblocks data pack`. VL-BERT trains on
    train2014 + val2014 for its test-dev numbers (`train_splits = ['train2014', 'val2014']`),
    which leaves no local validation; the default holds val2014 out.

    Args:
        root: the folder holding `vqa/` and the features; None writes and reads the embedded
            demo data (drawn scenes in this layout, `vlblocks.data.demo.task_data`).
        train_splits, val_split: VQA split names.
        answers, features: paths relative to `root` (or absolute).
        vocab: WordPiece `vocab.txt` (bert-base-uncased's); required.
        max_question_pieces, normalize_answers: see `VQADataset`.
        flip_probability: share of training samples flipped horizontally (VL-BERT's
            `TRAIN.FLIP_PROB`, 0.5); validation samples are never flipped.
        seed: seeds the per-sample flip draws.
        demo: where, how many and how large the demo scenes are when `root` is None.
    """
    demo_paths = None
    if root is None:
        demo_paths = write_demo_task("vqa", demo)
        root, vocab = str(demo_paths.root), str(demo_paths.vocab)
        train_splits = [demo_paths.train_split]  # the demo's validation split is val_split's default, val2014
    if vocab is None:
        raise ValueError("vqa_data.vocab is unset: give the WordPiece vocab.txt (bert-base-uncased's)")
    root_path = existing_file(root, "VQA data folder", "vqa_data.root")
    tokenizer = WordPieceTokenizer(existing_file(vocab, "vocab.txt", "vqa_data.vocab"))
    answer_list = read_vocabulary_keys(existing_file(root_path / answers, "answer vocabulary", "vqa_data.answers"))
    source = feature_source(existing_file(root_path / features, "region features", "vqa_data.features"))

    def split(name: str, flip: float = 0.0, index_offset: int = 0) -> VQADataset:
        questions = existing_file(root_path / "vqa" / f"v2_OpenEnded_mscoco_{name}_questions.json", "VQA questions", "vqa_data.root")
        annotations = root_path / "vqa" / f"v2_mscoco_{name}_annotations.json"
        reader = VQAReader(questions, annotations if annotations.is_file() else None)
        return VQADataset(reader, source, tokenizer, answer_list, max_question_pieces, seed, flip, index_offset, normalize_answers)

    train_parts: list[VQADataset] = []
    for name in train_splits:
        train_parts.append(split(name, flip_probability, sum(len(part) for part in train_parts)))
    train = train_parts[0] if len(train_parts) == 1 else _TrainSplits(train_parts)
    return RunData(
        train=train,
        val=split(val_split),
        tokenizer=tokenizer,
        description=demo_description("VQA", demo_paths, "vqa_data.root") if demo_paths else f"fine-tuning VQA on {' + '.join(train_splits)} of {root_path} (validation: {val_split}, {len(answer_list)} answers)",
        collate=collate_pretraining,
        answers=answer_list,
        is_demo=demo_paths is not None,
    )


def read_vocabulary_keys(path: Path) -> list[str]:
    """`vocabulary_keys` of an answer file (VL-BERT's reading of `answers_vqa.txt`).

    Raises:
        DataError: the file is unreadable, or two lines become the same key.
    """
    keys = vocabulary_keys(read_answer_vocabulary(path))
    try:
        vocabulary_index(keys)
    except ValueError as error:
        raise DataError(f"answer vocabulary {path}: after lower-casing and the punctuation step, {error}") from None
    return keys
