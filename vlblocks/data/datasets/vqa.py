"""VQA v2 fine-tuning samples: `[CLS] question [SEP] [MASK] [SEP]` over precomputed region features."""

from __future__ import annotations

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
from vlblocks.data.formats.vqa_answers import answer_targets, read_answer_vocabulary, vocabulary_index
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer

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
    its region features. Boxes stay in the original image's pixels.

    Args:
        reader: `VQAReader` (annotations give `answer_scores`; a test split gives None).
        features: image id → `RegionFeatures` (`FeatureDirectory` or a packed store).
        tokenizer: WordPiece tokenizer.
        answers: the answer vocabulary (`answers_vqa.txt`), in classifier order.
        max_question_pieces: keep at most this many question pieces (None: all).
    """

    def __init__(
        self, reader: Sequence[VQAQuestion], features: FeatureSource, tokenizer: Tokenizer, answers: Sequence[str],
        max_question_pieces: Optional[int] = None,
    ) -> None:
        self.reader = reader
        self.features = features
        self.tokenizer = tokenizer
        self.answer_index = vocabulary_index(answers)
        self.max_question_pieces = max_question_pieces
        self.skip_bad_records = False
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.reader)

    def length(self, index: int) -> int:
        return len(self.reader[index].question_tokens)

    def __getitem__(self, index: int) -> EncodedSample:
        question = self.reader[index]
        pieces, words = self.tokenizer.encode_words(question.question_tokens)
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
        scores = None
        if question.answers is not None:
            scores = answer_targets(question.answers, self.answer_index)
        return EncodedSample(
            text_ids=text_ids,
            word_index=np.asarray([-1, *words, -1, -1, -1], np.int64),
            boxes=np.concatenate([whole_box, regions.boxes.astype(np.float32)]),
            class_scores=None,
            features=np.concatenate([whole_feature[None], regions.features]).astype(np.float32),
            image=None,
            image_size=(width, height),
            segment_ids=segment_ids,
            answer_position=len(pieces) + 2,
            answer_scores=scores,
        )


def vqa_data(
    root: Optional[str] = None,
    train_splits: Sequence[str] = ("train2014",),
    val_split: str = "val2014",
    answers: str = "vqa/answers_vqa.txt",
    features: str = "vgbua_res101_precomputed/trainval2014_resnet101_faster_rcnn_genome",
    vocab: Optional[str] = None,
    max_question_pieces: Optional[int] = None,
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
        max_question_pieces: see `VQADataset`.
        demo: where, how many and how large the demo scenes are when `root` is None.
    """
    demo_paths = None
    if root is None:
        demo_paths = write_demo_task("vqa", demo)
        root, vocab = str(demo_paths.root), str(demo_paths.vocab)
        train_splits, val_split = [demo_paths.train_split], demo_paths.val_split
    if vocab is None:
        raise ValueError("vqa_data.vocab is unset: give the WordPiece vocab.txt (bert-base-uncased's)")
    root_path = existing_file(root, "VQA data folder", "vqa_data.root")
    tokenizer = WordPieceTokenizer(existing_file(vocab, "vocab.txt", "vqa_data.vocab"))
    answer_list = read_answer_vocabulary(existing_file(root_path / answers, "answer vocabulary", "vqa_data.answers"))
    source = feature_source(existing_file(root_path / features, "region features", "vqa_data.features"))

    def split(name: str) -> VQADataset:
        questions = existing_file(root_path / "vqa" / f"v2_OpenEnded_mscoco_{name}_questions.json", "VQA questions", "vqa_data.root")
        annotations = root_path / "vqa" / f"v2_mscoco_{name}_annotations.json"
        reader = VQAReader(questions, annotations if annotations.is_file() else None)
        return VQADataset(reader, source, tokenizer, answer_list, max_question_pieces)

    train_parts = [split(name) for name in train_splits]
    train = train_parts[0] if len(train_parts) == 1 else ConcatDataset(train_parts)
    return RunData(
        train=train,
        val=split(val_split),
        tokenizer=tokenizer,
        description=demo_description("VQA", demo_paths, "vqa_data.root") if demo_paths else f"fine-tuning VQA on {' + '.join(train_splits)} of {root_path} (validation: {val_split}, {len(answer_list)} answers)",
        collate=collate_pretraining,
        answers=answer_list,
        is_demo=demo_paths is not None,
    )
