"""Predictions from a fine-tuned model: `load` and the VQA, RefCOCO and VCR predictors.

`load` rebuilds a task model with its preprocessing, from an exported folder (`vlblocks export`)
or from a recipe and a checkpoint. Every prediction encodes the user's example with the
training datasets' own code (`VQADataset`, `RefCocoDataset.encode`, `VCRDataset.encode`, then
the run's collate), as the validation split is encoded, so a prediction equals the evaluation
path's on the same example.

vlblocks ships no object detector: regions come from a features file (bottom-up-attention TSV,
npz, per-image json, a packed store) or from boxes the caller gives; a whole image with a grid
of boxes is only used when asked for (`boxes="grid"`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import gin
import numpy as np
import torch
from PIL import Image

from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.app.run import build_run
from vlblocks.contracts import Echo
from vlblocks.data.datasets.refcoco import RefCocoDataset
from vlblocks.data.datasets.vcr import VCRDataset
from vlblocks.data.datasets.vqa import VQADataset
from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import RegionFeatures, index_tsv, read_at, read_feature_json, read_npz
from vlblocks.data.formats.feature_store import FeatureStore
from vlblocks.data.formats.records import basic_tokenize
from vlblocks.data.formats.refcoco import ReferringExpression
from vlblocks.data.formats.vcr import GroundedText, VCRItem, VCRMetadata
from vlblocks.data.formats.vqa import VQAQuestion
from vlblocks.data.pipeline.collate import collate_choice_groups, collate_pretraining
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer
from vlblocks.models.grounding_task import ReferringExpressionTask
from vlblocks.models.task import Task
from vlblocks.models.vcr_task import VCRTask
from vlblocks.models.vqa_task import VQATask
from vlblocks.train.checkpoint import load_checkpoint

# The files of an exported folder.
RECIPE_FILE, MODEL_FILE, VOCAB_FILE, PREPROCESSING_FILE, ANSWERS_FILE, BERT_FOLDER = (
    "recipe.gin", "model.safetensors", "vocab.txt", "preprocessing.json", "answers.json", "bert",
)
TASK_KINDS = {VQATask: "vqa", VCRTask: "vcr", ReferringExpressionTask: "refcoco"}
# What an exported recipe must not reach for when rebuilt elsewhere: its weights come from the folder.
LOAD_BINDINGS = ("build_model.bert_directory = None", "experiment.pretrained = None")
NO_DETECTOR = (
    "no regions given: vlblocks ships no object detector; pass boxes=[[x1, y1, x2, y2], ...] in image pixels "
    "(or features= from a bottom-up-attention TSV / npz / packed store), or boxes='grid' for the whole image "
    "plus a {cells} x {cells} grid of boxes"
)
GRID_CELLS = 3


class InferenceError(ValueError):
    """A model cannot be loaded or an example cannot be encoded: says which file or argument and why."""


@dataclass
class Preprocessing:
    """What turns a user's example into the model's input, as the run's validation data did.

    Attributes:
        kind: "vqa", "vcr" or "refcoco".
        vocab: the WordPiece vocab.txt.
        image_transform: resize and normalisation (VCR, RefCOCO), else None.
        answers: the answer vocabulary in classifier order (VQA), else None.
        settings: the datasets' other options: max_question_pieces (VQA); vcr_task,
            max_text_pieces, classes (VCR).
    """

    kind: str
    vocab: Path
    image_transform: Optional[ImageTransform] = None
    answers: Optional[list[str]] = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON of `preprocessing.json` (vocab and answers live in their own files)."""
        transform = None
        if self.image_transform is not None:
            t = self.image_transform
            transform = {"shorter_side": t.shorter_side, "longer_side": t.longer_side, "mean": list(t.mean), "std": list(t.std), "bgr": t.bgr}
        return {"kind": self.kind, "image_transform": transform, "settings": self.settings}

    @classmethod
    def from_folder(cls, folder: Path) -> "Preprocessing":
        """Read `preprocessing.json`, `vocab.txt` and (VQA) `answers.json` of an exported folder."""
        data = _read_json(folder / PREPROCESSING_FILE)
        try:
            kind, transform, settings = data["kind"], data["image_transform"], data["settings"]
        except (KeyError, TypeError) as error:
            raise InferenceError(f"{folder / PREPROCESSING_FILE}: field {error} is missing") from None
        if kind not in TASK_KINDS.values():
            raise InferenceError(f"{folder / PREPROCESSING_FILE}: field 'kind' is {kind!r}, expected one of {sorted(TASK_KINDS.values())}")
        answers = _read_json(folder / ANSWERS_FILE) if kind == "vqa" else None
        return cls(kind, _required(folder / VOCAB_FILE), ImageTransform(**transform) if transform else None, answers, settings)

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        return WordPieceTokenizer(self.vocab)


def _required(path: Path) -> Path:
    if not path.is_file():
        raise InferenceError(f"{path}: missing (not a folder written by `vlblocks export`?)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_required(path).read_text())
    except (OSError, ValueError) as error:
        raise InferenceError(f"{path}: cannot be read as JSON ({error})") from None


def preprocessing_of(task: Task, data: Any) -> Preprocessing:
    """The preprocessing of a built run: read from its validation dataset (never flipped)."""
    kind = task_kind(task, "the recipe")
    val = data.val
    vocab = Path(data.tokenizer.vocab_file)
    if kind == "vqa":
        return Preprocessing(kind, vocab, answers=list(data.answers), settings={"max_question_pieces": val.max_question_pieces})
    if kind == "refcoco":
        return Preprocessing(kind, vocab, val.image_transform)
    classes = sorted(val.class_index, key=val.class_index.get)
    return Preprocessing(kind, vocab, val.image_transform, settings={"vcr_task": val.task, "max_text_pieces": val.max_text_pieces, "classes": classes})


def task_kind(task: Task, source: str) -> str:
    """"vqa", "vcr" or "refcoco" for the fine-tuning tasks; anything else cannot predict."""
    kind = TASK_KINDS.get(type(task))
    if kind is None:
        raise InferenceError(
            f"{source} builds a {type(task).__name__}; predictions need a fine-tuned VQATask, VCRTask or ReferringExpressionTask"
        )
    return kind


def model_from_run(recipe: str | Path, checkpoint: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> tuple[Task, Preprocessing]:
    """Build the recipe's run (its data included) and load `checkpoint` into the task, strictly."""
    task, data, _ = build_run(recipe, bindings, echo)
    preprocessing = preprocessing_of(task, data)
    load_checkpoint(task, checkpoint, gin.config_str())
    return task, preprocessing


@dataclass
class _FolderData:
    """What `Task.fit_to_data` asks of a run's data, from an exported folder."""

    tokenizer: WordPieceTokenizer
    answers: Optional[list[str]]

    def fit_region_classes(self, columns: int, echo: Echo) -> None:
        """Exported weights already fit."""


def model_from_folder(folder: str | Path) -> tuple[Task, Preprocessing]:
    """Rebuild the task of an exported folder from its `recipe.gin` alone and load its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such folder (give a folder written by `vlblocks export`, or (recipe, checkpoint))")
    recipe = _required(folder / RECIPE_FILE)
    preprocessing = Preprocessing.from_folder(folder)
    parse_recipe(recipe, LOAD_BINDINGS)
    build_task = build_from_recipe(recipe, experiment)[0]
    task = build_from_recipe(recipe, build_task, _quiet)
    if task_kind(task, str(recipe)) != preprocessing.kind:
        raise InferenceError(f"{folder}: {RECIPE_FILE} builds a {type(task).__name__} but {PREPROCESSING_FILE} is for {preprocessing.kind}")
    task.fit_to_data(_FolderData(preprocessing.tokenizer, preprocessing.answers), _quiet)
    load_checkpoint(task, _required(folder / MODEL_FILE), gin.config_str())
    return task, preprocessing


def _quiet(line: str) -> None:
    """Where the rebuild's reports go: loading a model prints nothing."""


def load(source: str | Path | tuple[str | Path, str | Path], device: str | torch.device = "cpu", bindings: Sequence[str] = ()) -> "Predictor":
    """A predictor (`VQAPredictor`, `GroundingPredictor` or `VCRPredictor`) in eval mode on `device`.

    Args:
        source: a folder written by `vlblocks export`, or (recipe, checkpoint); the latter
            builds the recipe's data too (the tokenizer, answers and image transform come from it).
        bindings: `--bind` overrides for a (recipe, checkpoint) source.

    Raises:
        InferenceError: the folder is incomplete, or its model is not a fine-tuned task.
        CheckpointError: the weights do not fit the recipe's model (e.g. another architecture).
    """
    if isinstance(source, (tuple, list)):
        recipe, checkpoint = source
        task, preprocessing = model_from_run(recipe, checkpoint, bindings, _quiet)
    else:
        task, preprocessing = model_from_folder(source)
    return PREDICTORS[preprocessing.kind](task.to(device).eval(), preprocessing)


# ---------------------------------------------------------------------------------------------
# Inputs


def read_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image (no EXIF rotation: boxes are in stored pixels)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError, Image.DecompressionBombError) as error:
        raise InferenceError(f"cannot read image {image}: {error}") from None


def grid_boxes(width: int, height: int, cells: int = GRID_CELLS) -> np.ndarray:
    """[cells * cells, 4] float32 boxes tiling the image row by row, inclusive pixel ends
    (e.g. 90 x 60, 3 cells: the first is [0, 0, 29, 19])."""
    xs = np.linspace(0, width, cells + 1)
    ys = np.linspace(0, height, cells + 1)
    return np.asarray(
        [[xs[i], ys[j], xs[i + 1] - 1, ys[j + 1] - 1] for j in range(cells) for i in range(cells)], dtype=np.float32
    )


def region_boxes(boxes: Any, width: int, height: int) -> np.ndarray:
    """[N, 4] float32 boxes (x1, y1, x2, y2 in image pixels) from the caller's `boxes`, or the
    grid for `boxes="grid"`.

    Raises:
        InferenceError: no boxes (vlblocks has no detector), or boxes of a wrong shape or order.
    """
    if boxes is None:
        raise InferenceError(NO_DETECTOR.format(cells=GRID_CELLS))
    if isinstance(boxes, str):
        if boxes != "grid":
            raise InferenceError(f"boxes={boxes!r}: give [[x1, y1, x2, y2], ...] or 'grid'")
        return grid_boxes(width, height)
    array = np.asarray(boxes, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
        raise InferenceError(f"boxes: expected [N, 4] (x1, y1, x2, y2) with N >= 1, got shape {array.shape}")
    if not np.isfinite(array).all() or (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise InferenceError("boxes: every box needs finite x1 <= x2 and y1 <= y2")
    return array


def read_features(features: Any, image_id: Optional[str | int] = None) -> RegionFeatures:
    """One image's regions: a `RegionFeatures`, or a file: `.npz`, per-image `.json`, a
    bottom-up-attention `.tsv` (with `image_id`), or a packed store folder (with `image_id`).

    Raises:
        InferenceError: unknown kind of file, `image_id` missing or not in the file, or a bad file.
    """
    if isinstance(features, RegionFeatures):
        return features
    path = Path(features)
    try:
        if path.is_dir() and (path / "index.json").is_file():
            return FeatureStore(path)[_needed_id(image_id, path)]
        if path.suffix == ".npz":
            return read_npz(path)
        if path.suffix == ".json":
            return read_feature_json(path)
        if path.suffix == ".tsv":
            offsets = index_tsv(path)
            key = str(_needed_id(image_id, path))
            if key not in offsets:
                raise InferenceError(f"{path}: no line for image_id {key}")
            return read_at(path, offsets[key])
    except (DataError, KeyError) as error:
        raise InferenceError(f"{path}: {error}") from None
    raise InferenceError(f"features={features}: give a RegionFeatures, an .npz, .json or .tsv file, or a packed store folder")


def _needed_id(image_id: Optional[str | int], path: Path) -> str | int:
    if image_id is None:
        raise InferenceError(f"{path} holds many images: pass image_id= to choose one")
    return image_id


def grounded(text: str | GroundedText) -> GroundedText:
    """A `GroundedText` as given, or a sentence's basic-tokenised words, each seeing the whole image."""
    if isinstance(text, GroundedText):
        return text
    words = basic_tokenize(text)
    return GroundedText(words, [0] * len(words))


# ---------------------------------------------------------------------------------------------
# Predictors


class Predictor:
    """A task in eval mode with its preprocessing; subclasses encode one example and read the output."""

    def __init__(self, task: Task, preprocessing: Preprocessing) -> None:
        self.task = task
        self.preprocessing = preprocessing
        self.tokenizer = preprocessing.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.task.parameters()).device

    @torch.no_grad()
    def outputs(self, batch: Any) -> torch.Tensor:
        """The task's `model_output` for a collated batch, on the CPU in float32."""
        return self.task(batch.to(self.device)).model_output.float().cpu()


class VQAPredictor(Predictor):
    """`answer`: top-k answers of a question about an image's precomputed regions."""

    def encode(self, question: str, regions: RegionFeatures) -> Any:
        """The batch of one question, encoded by `VQADataset` as a validation question is."""
        asked = VQAQuestion(record="question", question_id=0, image_id=0, question=question, question_tokens=basic_tokenize(question))
        dataset = VQADataset(
            [asked], lambda _: regions, self.tokenizer, self.preprocessing.answers, self.preprocessing.settings.get("max_question_pieces")
        )
        return collate_pretraining([dataset[0]])

    def answer(
        self, image: Any = None, question: str = "", boxes: Any = None, features: Any = None, image_id: Optional[str | int] = None, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """The `top_k` answers, best first, as {"answer", "score"} with the classifier's sigmoid
        score (the model is trained with binary cross-entropy per answer).

        The model reads precomputed region features (`features`, with `image_id` for a file of
        many images); `image` and `boxes` cannot stand in for them, since it has no backbone.
        """
        if features is None:
            raise InferenceError(
                "this VQA model reads precomputed region features and vlblocks ships no detector: pass features= "
                "(a RegionFeatures, or a bottom-up-attention .tsv / .npz / .json file or packed store with image_id=)"
            )
        logits = self.outputs(self.encode(question, read_features(features, image_id)))[0]
        scores, indices = logits.sigmoid().topk(min(top_k, logits.numel()))
        return [{"answer": self.preprocessing.answers[i], "score": float(s)} for s, i in zip(scores.tolist(), indices.tolist())]


class GroundingPredictor(Predictor):
    """`ground`: the box a referring expression names, among the whole image and given boxes."""

    def encode(self, picture: Image.Image, expression: str, boxes: np.ndarray) -> Any:
        """The batch of one expression, encoded by `RefCocoDataset.encode` as a validation one is."""
        referring = ReferringExpression(
            record="expression", ref_id=0, sent_id=0, image_id=0, split="user", tokens=basic_tokenize(expression), sentence=expression,
            target_box=np.zeros(4, np.float32), candidate_boxes=boxes, category_id=0, ann_id=0, candidate_ids=list(range(len(boxes))),
            image_file_name=None, annotation_boxes=np.zeros((0, 4), np.float32), annotation_ids=[],
        )
        dataset = RefCocoDataset([referring], ".", self.tokenizer, self.preprocessing.image_transform)
        return collate_pretraining([dataset.encode(referring, flip=False, picture=picture)])

    def ground(self, image: Any, expression: str, boxes: Any = None) -> dict[str, Any]:
        """{"box": [x1, y1, x2, y2] in the image's pixels, "box_index": its position in `boxes`
        (None when the whole image wins), "score": its sigmoid score, "scores": [1 + N] scores of
        the whole image then each box}. The argmax runs over the whole image and the boxes, as
        in evaluation."""
        picture = read_image(image)
        candidates = region_boxes(boxes, *picture.size)
        scores = self.outputs(self.encode(picture, expression, candidates))[0].sigmoid()
        best = int(scores.argmax())
        whole = [0.0, 0.0, picture.width - 1.0, picture.height - 1.0]
        box = whole if best == 0 else candidates[best - 1].tolist()
        return {"box": box, "box_index": None if best == 0 else best - 1, "score": float(scores[best]), "scores": scores.tolist()}


@dataclass(frozen=True)
class _GivenVCRItem(VCRItem):
    """A VCR question whose image and detections are given in memory, not read from files."""

    picture: Optional[Image.Image] = None
    metadata: Optional[VCRMetadata] = None

    def load_image(self) -> Image.Image:
        return self.picture

    def load_metadata(self) -> VCRMetadata:
        return self.metadata


class VCRPredictor(Predictor):
    """`choose`: a probability per choice of a VCR-style multiple-choice question."""

    def encode(
        self, picture: Image.Image, question: GroundedText, choices: list[GroundedText], boxes: np.ndarray, answer: Optional[GroundedText],
        objects: list[str], polygons: list[list[np.ndarray]],
    ) -> Any:
        """The batch of one question, encoded by `VCRDataset.encode` as a validation one is."""
        settings = self.preprocessing.settings
        metadata = VCRMetadata(boxes, np.ones(len(boxes), np.float32), polygons, picture.width, picture.height, objects)
        q2a = settings["vcr_task"] == "q2a"
        item = _GivenVCRItem(
            record="question", annot_id="question", movie="", objects=objects, image_file=Path(), metadata_file=Path(), question=question,
            answer_choices=choices if q2a else [answer], rationale_choices=[] if q2a else choices, answer_label=None if q2a else 0,
            rationale_label=None, picture=picture, metadata=metadata,
        )
        dataset = VCRDataset([item], self.tokenizer, self.preprocessing.image_transform, settings["vcr_task"], settings["max_text_pieces"], settings["classes"])
        return collate_choice_groups([dataset.encode(item)])

    def choose(
        self, image: Any, question: str | GroundedText, choices: Sequence[str | GroundedText], boxes: Any = None,
        answer: Optional[str | GroundedText] = None, objects: Optional[Sequence[str]] = None, polygons: Optional[Sequence[Any]] = None,
    ) -> dict[str, Any]:
        """{"probabilities": softmax over the choices' logits (as VL-BERT's VCR test), "choice":
        the best one's index}.

        Args:
            image, boxes: the picture and its regions (pixels; 'grid' on request).
            question, choices: sentences, or `GroundedText` whose words point at boxes (1 + index).
            answer: for a QA→R model, the answer whose rationale is chosen.
            objects: each box's class name (the detector's classes of the recipe); default background.
            polygons: each box's instance polygons ([P, 2] x, y pixel points), which VL-BERT
                multiplies into the region features as 14 x 14 masks; default the box itself.
        """
        if len(choices) < 2:
            raise InferenceError(f"choices: give at least 2, got {len(choices)}")
        qa2r = self.preprocessing.settings["vcr_task"] == "qa2r"
        if qa2r and answer is None:
            raise InferenceError("this is a QA→R model: pass answer= (the answer whose rationale to choose)")
        picture = read_image(image)
        candidates = region_boxes(boxes, *picture.size)
        names = list(objects) if objects is not None else [self.preprocessing.settings["classes"][0]] * len(candidates)
        if len(names) != len(candidates):
            raise InferenceError(f"objects: {len(names)} names for {len(candidates)} boxes")
        if polygons is None:
            polygons = [[np.asarray([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)] for x1, y1, x2, y2 in candidates.tolist()]
        if len(polygons) != len(candidates):
            raise InferenceError(f"polygons: {len(polygons)} entries for {len(candidates)} boxes")
        texts = grounded(question), [grounded(c) for c in choices], grounded(answer) if qa2r else None
        batch = self.encode(picture, texts[0], texts[1], candidates, texts[2], names, list(polygons))
        probabilities = self.outputs(batch)[0].softmax(-1)
        return {"probabilities": probabilities.tolist(), "choice": int(probabilities.argmax())}


PREDICTORS = {"vqa": VQAPredictor, "refcoco": GroundingPredictor, "vcr": VCRPredictor}
