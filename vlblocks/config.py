"""Gin registration of every block and model, and recipe parsing with readable errors.

Recipes name classes exactly as the code does (`VLBert`, `VLEmbedding`, ...). Blocks stay
plain classes: registration happens here, once, with `gin.external_configurable`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import tokenize
from pathlib import Path
from typing import Callable, Optional, Sequence

import gin
from torch import nn

from vlblocks.blocks.backbones import (
    DilatedC5RoIHead,
    FlattenRoIHead,
    IdentityBackbone,
    PooledRoIHead,
    ResNetC4Backbone,
    TinyBackbone,
)
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.heads import MaskedLMHead, MaskedRegionHead, RelationHead
from vlblocks.blocks.region_features import EndToEndRegionFeatures, PrecomputedRegionFeatures
from vlblocks.blocks.roi_align import RoIAlign
from vlblocks.blocks.task_heads import AnswerHead, ChoiceHead, RegionScoreHead
from vlblocks.blocks.visual import VisualFeatureEmbedding
from vlblocks.data.images import ImageTransform
from vlblocks.data.pretraining_data import pretraining_data
from vlblocks.data.refcoco_dataset import refcoco_data
from vlblocks.data.vcr_dataset import vcr_data
from vlblocks.data.vqa_dataset import vqa_data
from vlblocks.interop.hf_bert import load_bert_weights
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.vlbert import VLBert
from vlblocks.objectives.grounding_task import ReferringExpressionTask
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.masked_region import MaskedRegionClassification
from vlblocks.objectives.pretraining_task import PretrainingTask
from vlblocks.objectives.relation import CaptionImageRelation
from vlblocks.objectives.text_only import TextOnlyMaskedLM
from vlblocks.objectives.vcr_task import VCRTask
from vlblocks.objectives.vqa_task import VQATask
from vlblocks.train.loop import Trainer

REGISTERED = (
    RegionGeometryEmbedding,
    VisualFeatureEmbedding,
    PrecomputedRegionFeatures,
    EndToEndRegionFeatures,
    RoIAlign,
    ResNetC4Backbone,
    DilatedC5RoIHead,
    TinyBackbone,
    PooledRoIHead,
    IdentityBackbone,
    FlattenRoIHead,
    VLEmbedding,
    TransformerEncoder,
    Pooler,
    MaskedLMHead,
    MaskedRegionHead,
    RelationHead,
    AnswerHead,
    ChoiceHead,
    RegionScoreHead,
    VLBert,
    VLBertForPretraining,
    MaskedLanguageModeling,
    MaskedRegionClassification,
    CaptionImageRelation,
    TextOnlyMaskedLM,
    PretrainingTask,
    VQATask,
    VCRTask,
    ReferringExpressionTask,
    ImageTransform,
    Trainer,
)
REGISTERED_FUNCTIONS = (pretraining_data, vqa_data, vcr_data, refcoco_data)


class RecipeError(ValueError):
    """A recipe could not be parsed or built; the message names the file, line and binding."""


@gin.configurable("build_model", module="vlblocks")
def build_model(
    model: nn.Module = gin.REQUIRED, bert_directory: Optional[str] = None, bert_ignore: Sequence[str] = ()
) -> nn.Module:
    """The recipe's model, optionally initialised from a local HF-format BERT directory.

    Args:
        model: the assembled model (`@VLBert()`, `@VLBertForPretraining()`, ...).
        bert_directory: directory with config.json and model.safetensors/pytorch_model.bin
            (e.g. bert-base-uncased); None keeps the random initialisation.
        bert_ignore: key prefixes of the BERT checkpoint to drop on purpose (the load is strict).
    """
    if bert_directory is not None:
        print(load_bert_weights(model, bert_directory, bert_ignore))
    return model


@gin.configurable("experiment", module="vlblocks")
def experiment(
    task: Optional[Callable[[], nn.Module]] = None,
    data: Optional[Callable[[], object]] = None,
    pretrained: Optional[str] = None,
    segment_b_from_a: bool = False,
) -> tuple[Callable[[], nn.Module], Callable[[], object], Optional[str], bool]:
    """What a run trains: builders (bound without parentheses, e.g. `@build_model`, `@vqa_data`)
    of the task and its data, and the pre-trained checkpoint a fine-tuning task starts from.

    Args:
        task: builds the task module; None: `PretrainingTask` (VL-BERT pre-training).
        data: builds the datasets; None: `pretraining_data`.
        pretrained: a vlblocks pre-training checkpoint (`step-*.safetensors`) loaded into the
            task through its `pretrained_prefixes`; None keeps the task's initialisation.
        segment_b_from_a: copy segment embedding row A to row B after loading (VL-BERT's
            `PARTIAL_PRETRAIN_SEGMB_INIT` for VCR: pre-training never trains segment B).
    """
    return task or CONFIGURED["PretrainingTask"], data or CONFIGURED["pretraining_data"], pretrained, segment_b_from_a


def _register() -> dict:
    return {
        configurable.__name__: gin.external_configurable(configurable, name=configurable.__name__, module="vlblocks")
        for configurable in (*REGISTERED, *REGISTERED_FUNCTIONS)
    }


CONFIGURED = _register()


def configured(name: str):
    """The gin-configured version of a registered class or function: calling it applies the recipe."""
    return CONFIGURED[name]


def registered_names() -> dict[str, list[str]]:
    """Each configurable name a recipe may use, with its parameter names."""
    names = {}
    for cls in (*REGISTERED, *REGISTERED_FUNCTIONS, build_model, experiment):
        names[cls.__name__] = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    return names


CHECKOUT_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_search_paths(recipe: Path) -> list[Path]:
    """Folders `include` statements are resolved against: the recipe's own, the enclosing
    `recipes/`, and the recipes of this checkout (so a user's recipe anywhere can include ours)."""
    paths = [recipe.parent]
    for parent in recipe.resolve().parents:
        if parent.name == "recipes":
            paths.append(parent)
            break
    if CHECKOUT_RECIPES.is_dir() and CHECKOUT_RECIPES not in paths:
        paths.append(CHECKOUT_RECIPES)
    return paths


def _close_matches_hint(message: str) -> str:
    names = registered_names()
    unknown = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)", message)
    if unknown:
        matches = difflib.get_close_matches(unknown.group(1).split(".")[-1], list(names), n=3, cutoff=0.5)
        return f"\n  Did you mean: {', '.join(matches)}?" if matches else f"\n  Known names: {', '.join(sorted(names))}"
    parameter = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if parameter:
        owner = parameter.group(1).split(".")[-1]
        known = names.get(owner, [])
        matches = difflib.get_close_matches(parameter.group(2), known, n=3, cutoff=0.5)
        hint = f"Did you mean: {', '.join(matches)}?" if matches else ""
        return f"\n  {hint}\n  {owner} takes: {', '.join(known)}".rstrip()
    return ""


@contextlib.contextmanager
def _includes_resolved_in(folders: Sequence[Path]):
    """Resolve `include` statements against `folders` (then the working directory), as plain files.

    gin keeps global include prefixes and also probes the Python path, which crashes on folders
    that look like namespace packages; recipes are plain files, so only those are looked up.
    """
    prefixes, readers = list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS)
    gin.config._LOCATION_PREFIXES[:] = [*(str(folder) for folder in folders), ""]
    gin.config._FILE_READERS[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        gin.config._LOCATION_PREFIXES[:] = prefixes
        gin.config._FILE_READERS[:] = readers


def parse_recipe(recipe: str | Path, bindings: Sequence[str] = ()) -> None:
    """Clear gin's state and load `recipe` plus `--bind` overrides ('Name.param = value').

    Raises:
        RecipeError: naming the file, line and binding at fault, with close matches for a
            misspelt configurable or parameter.
    """
    recipe = Path(recipe)
    if not recipe.is_file():
        raise RecipeError(f"recipe not found: {recipe}")
    gin.clear_config()
    try:
        with _includes_resolved_in(recipe_search_paths(recipe)):
            gin.parse_config_files_and_bindings([str(recipe)], list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError, OSError) as error:
        message = str(error)
        if "In file" not in message and "In bindings string" not in message:
            message = f"{message}\n  In file \"{recipe}\""
        raise RecipeError(message + _close_matches_hint(message)) from None
    except tokenize.TokenError as error:
        raise RecipeError(f"{recipe}: unfinished statement ({error.args[0]}) near line {error.args[1][0]}") from None


def build_from_recipe(recipe: str | Path, build):
    """Call `build()` under the parsed recipe, turning configuration errors into a `RecipeError`."""
    try:
        return build()
    except (ValueError, TypeError) as error:
        message = str(error)
        raise RecipeError(f"building from {recipe} failed: {message}{_close_matches_hint(message)}") from None


def model_from_recipe(recipe: str | Path, bindings: Sequence[str] = ()) -> nn.Module:
    """Parse a recipe and build its model (`build_model.model`)."""
    parse_recipe(recipe, bindings)
    return build_from_recipe(recipe, build_model)
