"""Gin registration: every name a recipe may use, registered once, here.

Recipes name classes exactly as the code does (`VLBert`, `VLEmbedding`, ...). Blocks, models and
objectives stay plain classes: every `nn.Module` that `vlblocks.blocks`, `vlblocks.models` and
`vlblocks.objectives` export is registered with `gin.external_configurable`, so exporting a new
one makes it a recipe name. The data builders, the image transform, the demo's size and the
trainer are listed by hand below.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from types import ModuleType
from typing import Callable, Iterator, Optional, Sequence

import gin
from torch import nn

from vlblocks import blocks, models, objectives
from vlblocks.contracts import Echo
from vlblocks.data.datasets.pretraining import pretraining_data
from vlblocks.data.datasets.refcoco import refcoco_data
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.datasets.vcr import vcr_data
from vlblocks.data.datasets.vqa import vqa_data
from vlblocks.data.demo.scenes import DemoScenes
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.interop.hf_bert import load_bert_weights
from vlblocks.models.task import Task
from vlblocks.train.loop import Trainer


def _exported_modules(*packages: ModuleType) -> tuple[type, ...]:
    """The `nn.Module` classes the packages export (`__all__`), the `Task` base excepted."""
    exported = (getattr(package, name) for package in packages for name in package.__all__)
    return tuple(item for item in exported if isinstance(item, type) and issubclass(item, nn.Module) and item is not Task)


REGISTERED = (*_exported_modules(blocks, models, objectives), ImageTransform, DemoScenes, Trainer)
REGISTERED_FUNCTIONS = (pretraining_data, vqa_data, vcr_data, refcoco_data)
# What every recipe starts from (it may rebind them): each data builder reads the one `DemoScenes`,
# so `DemoScenes.train = 240` works whatever the recipe.
DEFAULT_BINDINGS = tuple(
    f"{builder.__name__}.demo = @DemoScenes()" for builder in REGISTERED_FUNCTIONS if "demo" in inspect.signature(builder).parameters
)

# Where `build_model` sends its weight-loading report: the run's echo while a recipe is built.
_REPORT_ECHO: ContextVar[Echo] = ContextVar("vlblocks_report_echo", default=print)


@contextlib.contextmanager
def reports_to(echo: Echo) -> Iterator[None]:
    """Send the reports of what is built inside the block (BERT weight loads) to `echo`."""
    token = _REPORT_ECHO.set(echo)
    try:
        yield
    finally:
        _REPORT_ECHO.reset(token)


@gin.configurable("build_model", module="vlblocks")
def build_model(
    model: nn.Module = gin.REQUIRED, bert_directory: Optional[str] = None, bert_ignore: Sequence[str] = ()
) -> nn.Module:
    """The recipe's model, optionally initialised from a local HF-format BERT directory (the
    load's report goes to the echo of `reports_to`).

    Args:
        model: the assembled model (`@VLBert()`, `@VLBertForPretraining()`, ...).
        bert_directory: directory with config.json and model.safetensors/pytorch_model.bin
            (e.g. bert-base-uncased); None keeps the random initialisation.
        bert_ignore: key prefixes of the BERT checkpoint to drop on purpose (the load is strict).
    """
    if bert_directory is not None:
        _REPORT_ECHO.get()(str(load_bert_weights(model, bert_directory, bert_ignore)))
    return model


@gin.configurable("experiment", module="vlblocks")
def experiment(
    task: Optional[Callable[[], Task]] = None,
    data: Optional[Callable[[], RunData]] = None,
    pretrained: Optional[str] = None,
    segment_b_from_a: bool = False,
) -> tuple[Callable[[], Task], Callable[[], RunData], Optional[str], bool]:
    """What a run trains: builders (bound without parentheses, e.g. `@build_model`, `@vqa_data`)
    of the task and its data, and the checkpoint the task starts from.

    Args:
        task: builds the task module; None: `PretrainingTask` (VL-BERT pre-training).
        data: builds the datasets; None: `pretraining_data`.
        pretrained: a vlblocks pre-training checkpoint (`step-*.safetensors`) loaded into the
            task through its `pretrained_prefixes` (all of it for pre-training); None keeps the
            task's initialisation.
        segment_b_from_a: copy segment embedding row A to row B after loading (VL-BERT's
            `PARTIAL_PRETRAIN_SEGMB_INIT` for VCR: pre-training never trains segment B).
    """
    return task or CONFIGURED["PretrainingTask"], data or CONFIGURED["pretraining_data"], pretrained, segment_b_from_a


def _register() -> dict[str, Callable]:
    return {
        configurable.__name__: gin.external_configurable(configurable, name=configurable.__name__, module="vlblocks")
        for configurable in (*REGISTERED, *REGISTERED_FUNCTIONS)
    }


CONFIGURED = _register()


def configured(name: str) -> Callable:
    """The gin-configured version of a registered class or function: calling it applies the recipe."""
    return CONFIGURED[name]


def registered_names() -> dict[str, list[str]]:
    """Each configurable name a recipe may use, with its parameter names."""
    names = {}
    for cls in (*REGISTERED, *REGISTERED_FUNCTIONS, build_model, experiment):
        names[cls.__name__] = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    return names
