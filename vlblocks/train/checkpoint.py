"""Checkpoints: one folder per step, `step-XXXXXXX/`, holding the float32 weights
(`model.safetensors`, whose metadata records the step and the recipe) and, for a training run,
the training state (`training_state.pt`: optimiser, schedule, loss scaler, every random
generator, the data position), read back with `weights_only=True` so nothing pickled runs.

A folder is written under a temporary name, fsynced and renamed: a run killed while saving
leaves the previous checkpoints whole. Weights load strictly, and only after every tensor is
known to fit, so a failed load changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
_STEP_FOLDER = re.compile(r"^step-(\d{7,})$")
_SHOWN = 4  # names listed when tensors do not fit


def listed_names(names: Sequence[str], shown: int = _SHOWN) -> str:
    """The first `shown` of the sorted `names`, comma-separated, and how many there are in all
    when that is more: what an error about tensor names lists."""
    names = sorted(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model: names the file and why."""


def _stored_names(module: nn.Module) -> set[str]:
    """The names `save_model` stores: of parameters tied together, the first name in sorted order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return {min(names) for names in groups.values()}


def checkpoint_folder(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:07d}"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    module: nn.Module,
    directory: str | Path,
    step: int,
    recipe: str,
    training_state: Optional[dict[str, Any]] = None,
    weights: Optional[dict[str, Tensor]] = None,
) -> Path:
    """Write `directory/step-XXXXXXX/` (weights, and the training state when given) and return it.

    `weights` (e.g. an FSDP model's, gathered) replaces `module`'s own; tied parameters are
    stored once either way. The files go to a hidden temporary folder, are fsynced, and the
    folder is renamed into place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_folder(directory, step)
    temporary = directory / f".{final.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    metadata = {"step": str(step), "recipe": recipe}
    if weights is None:
        save_model(module, str(temporary / MODEL_FILE), metadata=metadata)
    else:
        stored = _stored_names(module)
        save_file({name: tensor.contiguous() for name, tensor in weights.items() if name in stored}, str(temporary / MODEL_FILE), metadata)
    if training_state is not None:
        torch.save(training_state, temporary / STATE_FILE)
    for file in temporary.iterdir():
        _fsync(file)
    _fsync(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync(directory)
    return final


def model_file(path: str | Path) -> Path:
    """The weights file of a checkpoint: `path/model.safetensors` for a step folder, else `path`."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def _open_header(path: str | Path) -> tuple[Path, dict[str, str], dict[str, tuple[int, ...]]]:
    """(weights file, metadata, tensor shapes), read from the header only."""
    file = model_file(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(file), "pt") as handle:
            return file, dict(handle.metadata() or {}), {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: not a readable safetensors checkpoint ({error})") from None


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint's weights: 'step' and 'recipe' for vlblocks checkpoints."""
    return _open_header(path)[1]


def recipe_differences(recorded: str, current: str, limit: int = 6) -> list[str]:
    """The bindings that differ between two resolved recipes (`gin.config_str()`), as
    'name: recorded -> current' lines (at most `limit`)."""

    def bindings(text: str) -> dict[str, str]:
        found: dict[str, str] = {}
        name = None
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                name = None
            elif " = " in line and not line.startswith(" "):
                name, value = line.split(" = ", 1)
                found[name] = value.rstrip("\\").strip()
            elif name is not None:
                found[name] += " " + line.strip().rstrip("\\").strip()
        return found

    old, new = bindings(recorded), bindings(current)
    names = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    lines = [f"{name}: {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}" for name in names[:limit]]
    return lines + ([f"... and {len(names) - limit} more"] if len(names) > limit else [])


def _misfits(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the stored tensors do not fit `module` (tied parameters count once), or []."""
    targets = module.state_dict()
    covered = {targets[name].data_ptr() for name in shapes if name in targets}
    unexpected = sorted(name for name in shapes if name not in targets)
    missing = sorted(name for name, tensor in targets.items() if name not in shapes and tensor.data_ptr() not in covered)
    wrong = sorted(f"{name} {shapes[name]} (the model's is {tuple(targets[name].shape)})" for name in shapes if name in targets and shapes[name] != tuple(targets[name].shape))
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
        if names:
            problems.append(f"{label}: {listed_names(names)}")
    return problems


def load_checkpoint(module: nn.Module, path: str | Path, recipe: Optional[str] = None) -> dict[str, str]:
    """Load a checkpoint's weights into `module`, strictly; returns the checkpoint's metadata.

    Nothing is loaded unless every stored tensor fits `module` and every parameter is stored.
    When they do not fit and `recipe` (the current `gin.config_str()`) is given, the error names
    the bindings in which the checkpoint's recorded recipe differs, rather than every tensor.

    Raises:
        CheckpointError: one line naming the file and what is wrong.
    """
    file, metadata, shapes = _open_header(path)
    problems = _misfits(module, shapes)
    if problems:
        differences = recipe_differences(metadata["recipe"], recipe) if recipe is not None and "recipe" in metadata else []
        if differences:
            raise CheckpointError(f"{file} was written by another recipe; it differs in {'; '.join(differences)}")
        raise CheckpointError(f"{file} does not fit the model: {'; '.join(problems)}")
    try:
        load_model(module, str(file), strict=True)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{file}: cannot be read ({str(error).splitlines()[0]})") from None
    return metadata


def error_summary(error: BaseException) -> str:
    """'Type: first line of the message', for a one-line error about a file."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_training_state(path: str | Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """The training state of a checkpoint folder (tensors and plain values only), which must
    hold every key in `required`.

    Raises:
        CheckpointError: the folder holds no training state, it cannot be read, or it is
            another kind of file (an optimiser's state, say) that lacks a `required` key.
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE} (weights only: it can start a run, not resume one)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises almost anything
        raise CheckpointError(f"{file}: cannot be read ({error_summary(error)})") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{file}: not the training state `vlblocks train` writes (no {', '.join(missing)})")
    return state


def step_folders(directory: str | Path) -> list[Path]:
    """The complete checkpoint folders of `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    folders = [path for path in directory.iterdir() if _STEP_FOLDER.match(path.name) and (path / MODEL_FILE).is_file()]
    return sorted(folders, key=lambda path: int(_STEP_FOLDER.match(path.name).group(1)))


def keep_last(directory: str | Path, count: int) -> None:
    """Delete all but the newest `count` checkpoint folders of `directory`."""
    for folder in step_folders(directory)[:-count] if count > 0 else []:
        shutil.rmtree(folder)


# A pre-training checkpoint may hold the tied word embeddings under the MLM decoder's name only.
TIED_WORD_EMBEDDINGS = {"model.mlm_head.decoder.weight": "model.vlbert.embedding.word_embeddings.weight"}


def load_pretrained(module: nn.Module, path: str | Path, prefixes: dict[str, str]) -> str:
    """Start a fine-tuning task from a pre-training checkpoint, renaming keys by prefix.

    Every checkpoint key under a prefix of `prefixes` (longest prefix wins) must land on a
    parameter of the same shape, or nothing is loaded and a `CheckpointError` names it; so is a
    checkpoint none of whose keys falls under a prefix (e.g. a task without its prefixes). Keys
    outside the prefixes (pre-training heads, objectives' tokens) are left out on purpose, and
    the task's parameters under the target prefixes that the checkpoint does not cover keep
    their initialisation; both lists are in the returned report.

    Args:
        module: the task (e.g. `VQATask`). path: a checkpoint folder (or its weights file).
        prefixes: checkpoint prefix → task prefix, e.g. {"model.vlbert.": "vlbert."}.
    """
    path = _open_header(path)[0]
    targets = module.state_dict()
    ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
    placed: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                alias = TIED_WORD_EMBEDDINGS.get(key)
                source = alias if alias is not None and alias not in keys else key
                match = next(((old, new) for old, new in ordered if source.startswith(old)), None)
                if match is None:
                    left_out.append(key)
                    continue
                name = match[1] + source[len(match[0]) :]
                tensor = handle.get_tensor(key)
                if name not in targets:
                    raise CheckpointError(f"{path}: {key} maps to {name}, which {type(module).__name__} does not have")
                if tuple(targets[name].shape) != tuple(tensor.shape):
                    raise CheckpointError(
                        f"{path}: {key} has shape {tuple(tensor.shape)} but {name} has {tuple(targets[name].shape)}"
                    )
                placed[name] = tensor
    except SafetensorError as error:
        raise CheckpointError(f"{path}: cannot be read ({error})") from None
    if not placed:
        raise CheckpointError(f"{path}: none of its tensors maps onto {type(module).__name__} (pretrained_prefixes {prefixes})")
    covered = tuple(new for _, new in ordered)
    kept = [name for name in targets if name.startswith(covered) and name not in placed]
    module.load_state_dict({**targets, **placed}, strict=True)
    lines = [f"loaded {len(placed)} tensors from {path}"]
    if kept:
        lines.append("not in the checkpoint, kept as initialised: " + ", ".join(kept))
    if left_out:
        lines.append(f"left out on purpose ({len(left_out)} tensors of pre-training heads and objectives): " + ", ".join(sorted(left_out)))
    return "\n".join(lines)
