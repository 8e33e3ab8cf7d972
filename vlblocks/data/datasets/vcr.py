"""VCR fine-tuning samples: each question becomes 4 rows `[CLS] question [SEP] choice [SEP]`.

Q→A asks the question and offers the 4 answers; QA→R asks the question followed by the right
answer and offers the 4 rationales. Every word piece sees the region of its word (the whole
image, or the detection the word stands for), as in VL-BERT.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from vlblocks.contracts import Tokenizer
from vlblocks.data.datasets.run_data import RunData, existing_file
from vlblocks.data.demo.scenes import DEMO_CLASSES, DemoScenes, demo_transform
from vlblocks.data.demo.task_data import demo_description, write_demo_task
from vlblocks.data.errors import DataError
from vlblocks.data.formats import zipped
from vlblocks.data.formats.coco_classes import COCO_CLASSES
from vlblocks.data.formats.vcr import GroundedText, VCRItem, VCRReader, instance_masks
from vlblocks.data.pipeline.collate import collate_choice_groups
from vlblocks.data.pipeline.flip import flip_boxes, flip_image
from vlblocks.data.pipeline.images import ImageTransform, scale_boxes
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.seeding import sample_random

TASKS = ("q2a", "qa2r")


def truncate_pair(question_length: int, choice_length: int, budget: int) -> tuple[int, int]:
    """The official Q→A rule for one choice: while question + choice pieces exceed `budget`,
    drop the choice's last piece if the choice is longer, else (ties too) the question's.
    Special tokens are not counted."""
    while question_length + choice_length > budget:
        if choice_length > question_length:
            choice_length -= 1
        else:
            question_length -= 1
    return question_length, choice_length


def truncate_choices(question_length: int, choice_lengths: Sequence[int], budget: int) -> tuple[int, list[int]]:
    """The official Q→A truncation of one question (`vcr/data/datasets/vcr.py`): the four
    choices are fitted in order against one question, which stays as short as the earlier choices
    left it; every row then uses the final question. Returns (question pieces, choice pieces)."""
    kept = []
    for length in choice_lengths:
        question_length, length = truncate_pair(question_length, length, budget)
        kept.append(length)
    return question_length, kept


def truncate_rationales(
    question_length: int, answer_length: int, rationale_lengths: Sequence[int], budget: int
) -> tuple[int, int, list[int]]:
    """The official QA→R truncation: the rationales are fitted in order against one question
    and one answer. While question + answer + rationale exceed `budget`: drop the rationale's
    last piece if it is longer than question and answer together, else the question's (ties
    too) while it has more than 1, else the answer's. Returns (question, answer, rationales)."""
    kept = []
    for length in rationale_lengths:
        while question_length + answer_length + length > budget:
            if length > question_length + answer_length:
                length -= 1
            elif question_length > 1:
                question_length -= 1
            else:
                answer_length -= 1
        kept.append(length)
    return question_length, answer_length, kept


class VCRDataset(Dataset):
    """VCR questions as groups of 4 `EncodedSample`s, one per choice (end-to-end pixels).

    Row c of a question: `[CLS] question [SEP] choice_c [SEP]` with
        segment_ids: 0 at [CLS], the question and the first [SEP]; 1 at the choice and last [SEP].
        token_regions: per piece, the region of its word (0 = whole image, i + 1 = detection i);
            0 at [CLS] / [SEP].
        word_index: per piece, its word; choice words are numbered after the question's, so
            every word of a row has its own index; -1 at [CLS] / [SEP].
        choice_label: 1.0 for the right choice, 0.0 for the others, None without labels.
    Q→A: the question with `answer_choices`, label `answer_label`. QA→R: the question's words
    followed by those of the right answer (grounding kept), with `rationale_choices`, label
    `rationale_label`.

    Text truncation, as the official code (64 pieces, special tokens not counted): Q→A fits
    the choices in order against one shared question (`truncate_choices`), QA→R the rationales
    against one shared question and answer (`truncate_rationales`).

    Regions (shared by the 4 rows): the whole image `[0, 0, w-1, h-1]` of the original image
    of size (w, h), then every detection of the metadata, in order, all scaled to the resized
    image of size (W, H) and clamped to it (as the official code, which adds the whole-image
    box before resizing). `region_classes` is 0 for
    the whole image, else the index of the detection's object name in `classes` (COCO: 1..80).
    `region_masks` are the 14 x 14 polygon masks VL-BERT multiplies into the RoI head's feature
    map (all ones for the whole image). Only the first row of a group carries the image; the
    others have `image=None` (see `collate_choice_groups`).

    Flip (training, official TRAIN.FLIP_PROB 0.5): with `flip_probability`, drawn per question
    from (seed, index), the image, every box (x → W - 1 - x) and every mask (along its columns)
    are mirrored, for all 4 rows at once; the words are kept ("left" stays "left", as the
    official VCR code does).

    Args:
        reader: the questions of one split.
        tokenizer: WordPiece tokenizer (`encode_words`, `cls_id`, `sep_id`).
        image_transform: resizes and normalises the image.
        task: "q2a" or "qa2r".
        max_text_pieces: question + choice pieces per row, special tokens not counted.
        classes: the detector's class names, background first (COCO's 81 for VCR).
        flip_probability: share of questions flipped horizontally (give 0 outside training).
        seed: with the index, decides which questions are flipped.
    """

    def __init__(
        self,
        reader: VCRReader,
        tokenizer: Tokenizer,
        image_transform: ImageTransform,
        task: str = "q2a",
        max_text_pieces: int = 64,
        classes: Sequence[str] = COCO_CLASSES,
        flip_probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"VCR task must be one of {TASKS}, got {task!r}")
        if max_text_pieces < 0:
            raise ValueError(f"max_text_pieces must be >= 0, got {max_text_pieces}")
        self.reader = reader
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.task = task
        self.max_text_pieces = max_text_pieces
        self.class_index = {name: index for index, name in enumerate(classes)}
        self.flip_probability = flip_probability
        self.seed = seed
        self.conditioned_answer: Optional[int] = None

    def conditioned_on(self, answer: int) -> "VCRDataset":
        """A QA→R copy whose questions are followed by answer choice `answer` (0-3) instead of
        the right one, untruncated, labelled by `rationale_label` when there is one: the
        official `vcr/function/test.py` scores the rationales given each answer this way
        (its test mode skips the QA→R truncation)."""
        if self.task != "qa2r" or answer not in range(4):
            raise ValueError(f"conditioned_on needs a QA→R dataset and an answer in 0-3, got task {self.task!r}, answer {answer!r}")
        conditioned = copy.copy(self)
        conditioned.conditioned_answer = answer
        return conditioned

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> list[EncodedSample]:
        return self.item_in_epoch(index, 0)

    def item_in_epoch(self, index: int, epoch: int) -> list[EncodedSample]:
        """Question `index` with the flip draw of `epoch`."""
        return self.encode(self.reader[index], self.flipped(index, epoch))

    def flipped(self, index: int, epoch: int = 0) -> bool:
        """Whether question `index` is flipped in `epoch`: its own draw, the same in any worker or order."""
        return sample_random(self.seed, epoch, index).random() < self.flip_probability

    def length(self, index: int) -> int:
        """Question words + the most words of a choice (reads the record): what a
        length-bucketing sampler sorts by. For QA→R the question includes the right answer."""
        question, choices, _ = self.texts(self.reader[index])
        return len(question.words) + max(len(choice.words) for choice in choices)

    def texts(self, item: VCRItem) -> tuple[GroundedText, list[GroundedText], Optional[int]]:
        """The question, the choices and the right choice's index (None when unlabelled).

        Raises:
            DataError: QA→R on a record without `answer_label` (the test split).
        """
        if self.task == "q2a":
            return item.question, item.answer_choices, item.answer_label
        chosen = item.answer_label if self.conditioned_answer is None else self.conditioned_answer
        if chosen is None:
            raise DataError(
                f"{item.record}, field 'answer_label': missing, but QA→R appends the right answer "
                "to the question (the test split has no labels)"
            )
        answer = item.answer_choices[chosen]
        question = GroundedText(
            words=item.question.words + answer.words,
            word_region=item.question.word_region + answer.word_region,
        )
        return question, item.rationale_choices, item.rationale_label

    def encode(self, item: VCRItem, flip: bool = False) -> list[EncodedSample]:
        """One question → 4 samples (see the class docstring); `flip` mirrors the image."""
        question, choices, label = self.texts(item)
        classes = region_classes(item, self.class_index)
        image, boxes, masks = self._regions(item, flip)
        image_size = (int(image.shape[2]), int(image.shape[1]))
        question_ids, question_words = self.tokenizer.encode_words(question.words)
        choice_pieces = [self.tokenizer.encode_words(choice.words) for choice in choices]
        kept_question, kept_choices = self._truncation(item, question_words, [len(ids) for ids, _ in choice_pieces])
        question_ids = [question_ids[p] for p in kept_question]
        question_part = [question_words[p] for p in kept_question]
        cls, sep = self.tokenizer.cls_id, self.tokenizer.sep_id
        offset = len(question.words)
        samples = []
        for number, (choice, (choice_ids, choice_words), kept_choice) in enumerate(zip(choices, choice_pieces, kept_choices)):
            choice_part = choice_words[:kept_choice]
            text_ids = [cls, *question_ids, sep, *choice_ids[:kept_choice], sep]
            word_index = [-1, *question_part, -1, *(offset + w for w in choice_part), -1]
            token_regions = [
                0,
                *(question.word_region[w] for w in question_part),
                0,
                *(choice.word_region[w] for w in choice_part),
                0,
            ]
            samples.append(
                EncodedSample(
                    text_ids=np.asarray(text_ids, dtype=np.int64),
                    word_index=np.asarray(word_index, dtype=np.int64),
                    boxes=boxes,
                    class_scores=None,
                    features=None,
                    image=image if number == 0 else None,
                    image_size=image_size,
                    pixel_normalization=self.image_transform.normalization() if number == 0 else None,
                    segment_ids=np.asarray([0] * (len(question_ids) + 2) + [1] * (kept_choice + 1), dtype=np.int64),
                    token_regions=np.asarray(token_regions, dtype=np.int64),
                    choice_label=None if label is None else float(number == label),
                    region_classes=classes,
                    region_masks=masks,
                )
            )
        return samples

    def _truncation(self, item: VCRItem, question_words: list[int], choice_lengths: list[int]) -> tuple[list[int], list[int]]:
        """The positions of the question pieces every row keeps and each choice's kept pieces.
        QA→R: `question_words` are those of the question then the right answer (word index
        >= the question's word count), truncated as the official code does each part."""
        if self.task == "q2a":
            kept, choices = truncate_choices(len(question_words), choice_lengths, self.max_text_pieces)
            return list(range(kept)), choices
        if self.conditioned_answer is not None:
            return list(range(len(question_words))), list(choice_lengths)
        asked = sum(1 for w in question_words if w < len(item.question.words))
        kept, answer, choices = truncate_rationales(asked, len(question_words) - asked, choice_lengths, self.max_text_pieces)
        return [*range(kept), *range(asked, asked + answer)], choices

    def _regions(self, item: VCRItem, flip: bool = False) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """The resized image [3, H, W] uint8, the boxes [N + 1, 4] float32 in its pixels and their
        14 x 14 instance masks [N + 1, 14, 14] (all ones for the whole image), whole image first;
        all mirrored when `flip`."""
        metadata = item.load_metadata()
        original = item.load_image()
        image, scale = self.image_transform.pixels(original)
        height, width = int(image.shape[1]), int(image.shape[2])
        whole = np.asarray([[0.0, 0.0, original.width - 1.0, original.height - 1.0]], dtype=np.float32)
        boxes = scale_boxes(np.concatenate([whole, metadata.boxes.astype(np.float32)]), scale, width, height)
        masks = instance_masks(metadata)
        masks = np.concatenate([np.ones((1, *masks.shape[1:]), np.float32), masks])
        if flip:
            image, boxes, masks = flip_image(image), flip_boxes(boxes, width), np.ascontiguousarray(masks[:, :, ::-1])
        return image, boxes.astype(np.float32), masks


def region_classes(item: VCRItem, class_index: dict[str, int]) -> np.ndarray:
    """[N + 1] int64: 0 for the whole image, then the class index of each of `item.objects`.

    Raises:
        DataError: an object name is not a known class (names the record and `objects`).
    """
    classes = [0]
    for position, name in enumerate(item.objects):
        if name not in class_index:
            raise DataError(f"{item.record}, field 'objects': object {position} {name!r} is not a known class")
        classes.append(class_index[name])
    return np.asarray(classes, dtype=np.int64)


def vcr_data(
    root: Optional[str] = None,
    task: str = "q2a",
    train_split: str = "train",
    val_split: str = "val",
    images: str = "vcr1images",
    vocab: Optional[str] = None,
    image_transform: Optional[ImageTransform] = None,
    max_text_pieces: int = 64,
    classes: Optional[Sequence[str]] = None,
    demo: DemoScenes = DemoScenes(),
    flip_probability: float = 0.0,
    seed: int = 0,
    name_counter: str = "dataset",
) -> RunData:
    """Build the VCR fine-tuning datasets from the official layout.

    Layout: `<root>/{train,val,test}.jsonl` and `<root>/vcr1images/` (`images` may also be a
    zip folder such as `vcr1images.zip@/vcr1images`). Relative `images` are under `root`.

    Args:
        root: the VCR folder; None writes and reads the embedded demo data (drawn scenes in
            this layout, `vlblocks.data.demo.task_data`, whose objects are the demo's shapes).
        task: "q2a" (question → answer) or "qa2r" (question + answer → rationale).
        train_split, val_split: annotation file stems under `root` (e.g. "val", "test").
        images: the image and metadata folder.
        vocab: WordPiece `vocab.txt` (bert-base-uncased's); required.
        image_transform: resize and normalisation; None is VL-BERT's VCR one (SCALES 600 /
            1200: shorter side 600, longer at most 1200).
        max_text_pieces: question + choice pieces per row (64 in VL-BERT).
        classes: the detector's class names, background first; None: COCO's 81 (the demo's
            shapes on the demo data).
        demo: where, how many and how large the demo scenes are when `root` is None.
        flip_probability: share of training questions flipped horizontally (official
            TRAIN.FLIP_PROB 0.5; the validation split is never flipped).
        seed: with each question's index, decides which training questions are flipped.
        name_counter: "dataset" (official: one person-name counter through each file) or
            "image" (restart at every question); see `VCRReader`.

    Raises:
        ValueError: `vocab` unset, or an unknown `task`.
        FileNotFoundError: a path is missing (the message names the binding that sets it).
    """
    demo_paths = None
    if root is None:
        demo_paths = write_demo_task("vcr", demo)
        root, vocab = str(demo_paths.root), str(demo_paths.vocab)
        image_transform = demo_transform(image_transform, demo.image_size)
    if vocab is None:
        raise ValueError("vcr_data.vocab is unset: set vcr_data.vocab to the WordPiece vocab.txt (bert-base-uncased's)")
    root_path = existing_file(root, "VCR folder", "vcr_data.root")
    train_file = existing_file(root_path / f"{train_split}.jsonl", "VCR training annotations", "vcr_data.train_split")
    val_file = existing_file(root_path / f"{val_split}.jsonl", "VCR validation annotations", "vcr_data.val_split")
    images_root = root_path / images
    archive = zipped.split_zip_path(str(images_root))
    existing_file(archive[0] if archive else images_root, "VCR images folder", "vcr_data.images")
    tokenizer = WordPieceTokenizer(existing_file(vocab, "WordPiece vocabulary", "vcr_data.vocab"))
    transform = image_transform if image_transform is not None else ImageTransform(shorter_side=600, longer_side=1200)
    train, val = (
        VCRDataset(
            VCRReader(path, images_root, name_counter=name_counter),
            tokenizer,
            transform,
            task,
            max_text_pieces,
            classes or (DEMO_CLASSES if demo_paths else COCO_CLASSES),
            flip_probability=flip_probability if split == "train" else 0.0,
            seed=seed,
        )
        for split, path in (("train", train_file), ("val", val_file))
    )
    return RunData(
        train=train,
        val=val,
        tokenizer=tokenizer,
        description=demo_description(f"VCR {task}", demo_paths, "vcr_data.root") if demo_paths else f"fine-tuning VCR {task} on {train_file} (validation: {val_file})",
        collate=collate_choice_groups,
        is_demo=demo_paths is not None,
    )
