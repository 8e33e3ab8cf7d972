"""`vlblocks convert hf` and `vlblocks convert to-hf`: transformers model folders (VisualBERT,
LXMERT) ↔ vlblocks checkpoints for a recipe.

Each transformers `model_type` has a converter module in `vlblocks.interop` with three functions:
`from_hf(hf_state, config)` (→ `VLBertForPretraining` keys), `to_hf(state, config)` (→ the
transformers `*ForPreTraining` keys) and `hf_config(model)` (→ the transformers config of a
vlblocks model). They are imported when used, so a missing one fails only its own model type.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import gin
from torch import Tensor, nn

from vlblocks.app.convert import NO_BERT, converted_path
from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.contracts import Echo
from vlblocks.interop.hf_directory import read_hf_directory
from vlblocks.interop.official_vlbert import module_prefix, write_weights_file
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.two_stream import TwoStreamModel
from vlblocks.models.vlbert import VLBert
from vlblocks.train.checkpoint import CheckpointError, listed_names, load_checkpoint

# The transformers model types with a converter (`converter_for`).
MODEL_TYPES = ("lxmert", "visual_bert")
# A core model's type → the model_type it exports as.
CORE_MODEL_TYPES = {VLBert: "visual_bert", TwoStreamModel: "lxmert"}
CORE = "vlbert."
# The config fields that decide what a converted model computes beyond its tensors' shapes: a
# recipe that differs from the transformers config in one of them is refused (dropout and
# initialisation may differ: they do not change the weights' meaning).
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "visual_embedding_dim", "bypass_transformer",
    "l_layers", "x_layers", "r_layers", "visual_feat_dim", "visual_pos_dim",
)
_SHOWN = 6


def converter_for(model_type: str) -> ModuleType:
    """The interop module converting a transformers `model_type`.

    Raises:
        CheckpointError: no converter for that model type.
    """
    if model_type == "visual_bert":
        from vlblocks.interop import hf_visualbert

        return hf_visualbert
    if model_type == "lxmert":
        from vlblocks.interop import hf_lxmert

        return hf_lxmert
    raise CheckpointError(f"model_type {model_type!r} has no converter; vlblocks converts {', '.join(MODEL_TYPES)}")


def _build_task(recipe: str | Path, bindings: Sequence[str], echo: Echo) -> nn.Module:
    """The recipe's task, built without its data and without its BERT directory (the weights
    come from elsewhere)."""
    parse_recipe(recipe, [*bindings, NO_BERT])
    build_task = build_from_recipe(recipe, experiment, echo)[0]
    return build_from_recipe(recipe, build_task, echo)


def _pretraining_model(task: nn.Module, recipe: str | Path) -> tuple[str, nn.Module]:
    """(prefix, module) of the task's `VLBertForPretraining`, else of its core model."""
    prefix = module_prefix(task, VLBertForPretraining)
    if prefix is not None:
        return prefix, task.get_submodule(prefix.rstrip(".")) if prefix else task
    for kind in CORE_MODEL_TYPES:
        prefix = module_prefix(task, kind)
        if prefix is not None:
            return prefix, task.get_submodule(prefix.rstrip(".")) if prefix else task
    raise CheckpointError(f"{recipe} builds a {type(task).__name__}, which holds no VLBertForPretraining, VLBert or TwoStreamModel")


def _check_fits(converter: ModuleType, model: nn.Module, config: Any, directory: Path, recipe: str | Path) -> None:
    """Refuse a recipe whose model computes something else than the transformers config says."""
    try:
        ours = converter.hf_config(model).to_dict()
    except ValueError as error:
        raise CheckpointError(f"{recipe}: {error}") from None
    theirs = config.to_dict()
    differences = [f"{name} {theirs[name]!r} (the recipe's model: {ours[name]!r})" for name in ARCHITECTURE_FIELDS if name in ours and name in theirs and ours[name] != theirs[name]]
    if differences:
        raise CheckpointError(f"{directory}/config.json does not describe the model of {recipe}: {'; '.join(differences)}")


def _placed(converted: dict[str, Tensor], prefix: str, model: nn.Module, directory: Path) -> dict[str, Tensor]:
    """The converted tensors under the task's names: below the `VLBertForPretraining`'s prefix,
    or (a task with a core model only) the core's tensors below the core's prefix."""
    if isinstance(model, VLBertForPretraining):
        return {prefix + key: value for key, value in converted.items()}
    heads = [key for key in converted if not key.startswith(CORE)]
    if heads:
        raise CheckpointError(
            f"{directory} holds pre-training heads ({listed_names(heads, _SHOWN)}) but the recipe's task has no VLBertForPretraining to hold them"
        )
    return {prefix + key[len(CORE) :]: value for key, value in converted.items()}


def _coverage_error(task: nn.Module, placed: dict[str, Tensor], directory: Path) -> str:
    """Why `placed` does not load strictly into `task`, or '' when it does."""
    targets = task.state_dict()
    unexpected = [key for key in placed if key not in targets]
    if unexpected:
        return f"{directory}: its tensors map to {listed_names(unexpected, _SHOWN)}, which {type(task).__name__} does not have"
    missing = [key for key in targets if key not in placed]
    if missing:
        hint = ""
        if any(".mlm_head." in f".{key}" or ".relation_head." in f".{key}" for key in missing):
            hint = (
                " (a model without pre-training heads, e.g. a VisualBertModel, converts into a recipe without them: "
                "--bind 'VLBertForPretraining.mlm_head = None' --bind 'VLBertForPretraining.relation_head = None' "
                "--bind 'PretrainingTask.objectives = []')"
            )
        return f"{directory} does not cover {type(task).__name__}: no tensor for {listed_names(missing, _SHOWN)}{hint}"
    wrong = [f"{key} {tuple(value.shape)} (the task's is {tuple(targets[key].shape)})" for key, value in placed.items() if value.shape != targets[key].shape]
    if wrong:
        return f"{directory}: tensors of another shape than the recipe's: {listed_names(wrong, _SHOWN)}"
    return ""


def convert_hf(directory: str | Path, recipe: str | Path, out: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> Path:
    """Convert a transformers model folder (`save_pretrained`: config.json + weights) into a
    vlblocks checkpoint for `recipe`'s task.

    The converter is chosen by the config's `model_type` and maps the folder's tensors before
    anything is built; the task is built without data and without the recipe's BERT
    directory; the recipe's model must match the config's architecture fields; the load is
    strict: every tensor of the task's `VLBertForPretraining` (or, for a task without one, of
    the whole task) must come from the folder. The objectives' own tensors, outside the model,
    keep their initialisation and are listed. The file's metadata holds the recipe, step 0 and
    the source folder (`vlblocks eval --checkpoint`, `experiment.pretrained` read it), and it
    appears whole or not at all.

    Raises:
        RecipeError: the recipe does not parse or build.
        CheckpointError: the folder is unreadable, its model type has no converter, or its
            weights or config do not fit the recipe's task.
    """
    directory = Path(directory)
    config, hf_state = read_hf_directory(directory)
    converter = converter_for(config.model_type)
    try:
        converted = converter.from_hf(hf_state, config)
    except CheckpointError as error:
        raise CheckpointError(f"{directory}: {error}") from None
    task = _build_task(recipe, bindings, echo)
    prefix, model = _pretraining_model(task, recipe)
    _check_fits(converter, model, config, directory, recipe)
    placed = _placed(converted, prefix, model, directory)
    # A pre-training task's objectives may hold tensors of their own (a masked-feature vector):
    # transformers has none, so they keep the task's initialisation. Nothing else does.
    kept = {}
    if isinstance(model, VLBertForPretraining):
        kept = {key: value for key, value in task.state_dict().items() if not key.startswith(prefix) and key not in placed}
    problem = _coverage_error(task, {**placed, **kept}, directory)
    if problem:
        raise CheckpointError(problem)
    task.load_state_dict({**placed, **kept}, strict=True)
    echo(f"converted {len(hf_state)} tensors of a {config.model_type} model from {directory} into {type(task).__name__}")
    if kept:
        echo(f"kept as initialised (the objectives' own tensors, which transformers has no counterpart for): {listed_names(list(kept), _SHOWN)}")
    metadata = {"step": "0", "recipe": gin.config_str(), "converted_from": str(directory)}
    return write_weights_file(task, converted_path(out), metadata)


def export_hf(checkpoint: str | Path, recipe: str | Path, out: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> Path:
    """Write a vlblocks checkpoint of `recipe`'s pre-training model as a transformers folder
    (`save_pretrained` of its `*ForPreTraining`: config.json + model.safetensors) at `out`.

    The task is built without data, the checkpoint loaded strictly; the converter is chosen by
    the core model's type (`VLBert` → VisualBERT, `TwoStreamModel` → LXMERT); the transformers
    model loads the converted tensors strictly. The folder is written under a temporary name and
    renamed when whole. Task tensors outside the model (an objective's) are left out and listed.

    Raises:
        FileExistsError: `out` exists and is not an empty folder (nothing written).
        RecipeError: the recipe does not parse or build.
        CheckpointError: the checkpoint does not fit the recipe, or its model is not one that
            transformers has (e.g. VL-BERT's packed layout).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder (nothing written)")
    task = _build_task(recipe, bindings, echo)
    metadata = load_checkpoint(task, checkpoint, gin.config_str())
    prefix = module_prefix(task, VLBertForPretraining)
    if prefix is None:
        raise CheckpointError(f"{recipe} builds a {type(task).__name__}; a transformers *ForPreTraining export needs a VLBertForPretraining in it")
    model = task.get_submodule(prefix.rstrip(".")) if prefix else task
    model_type = next((name for kind, name in CORE_MODEL_TYPES.items() if isinstance(model.vlbert, kind)), None)
    if model_type is None:
        raise CheckpointError(f"{recipe}: a {type(model.vlbert).__name__} core has no transformers counterpart (VLBert → VisualBERT, TwoStreamModel → LXMERT)")
    converter = converter_for(model_type)
    config = converter.hf_config(model)
    hf_state = converter.to_hf(model.state_dict(), config)
    import transformers  # heavy: imported only when exporting

    hf_class = getattr(transformers, config.architectures[0])
    hf_model = hf_class(config)
    try:
        hf_model.load_state_dict(hf_state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{hf_class.__name__} does not take the converted tensors: {str(error).splitlines()[0]}") from None
    temporary = out.parent / f".{out.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.parent.mkdir(parents=True, exist_ok=True)
    try:
        hf_model.save_pretrained(temporary)
        if out.exists():
            out.rmdir()
        temporary.rename(out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    left_out = [key for key in task.state_dict() if not key.startswith(prefix)]
    if left_out:
        echo(f"left out (outside the model, no transformers counterpart): {listed_names(left_out, _SHOWN)}")
    echo(f"exported {type(model).__name__} (step {metadata.get('step', '?')}) as {hf_class.__name__} to {out}")
    return out
