"""Checkpoints: safetensors weights that record their recipe, and a weights-only optimiser state."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the file and the key."""


def save_checkpoint(
    module: nn.Module, directory: str | Path, step: int, recipe: str, optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write `step-XXXXXXX.safetensors` (+ `.optim.pt`); the metadata holds the step and the recipe text.

    Files are written under a temporary name and renamed, so an interrupted save loses nothing
    already written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:07d}.safetensors"
    metadata = {"step": str(step), "recipe": recipe, "extra": json.dumps(extra or {})}
    temporary = path.with_suffix(".tmp")
    save_model(module, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    if optimizer is not None:
        optimizer_path = path.with_suffix(".optim.pt")
        torch.save(optimizer.state_dict(), optimizer_path.with_suffix(".tmp"))
        os.replace(optimizer_path.with_suffix(".tmp"), optimizer_path)
    return path


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def load_checkpoint(module: nn.Module, path: str | Path, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, str]:
    """Strictly load weights (and the optimiser state if asked); returns the metadata.

    Raises:
        CheckpointError: naming the file and the missing or unexpected keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        load_model(module, str(path), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit the model: {error}") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path.with_suffix(".optim.pt"), map_location="cpu", weights_only=True))
    return checkpoint_metadata(path)


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
        module: the task (e.g. `VQATask`). path: a `.safetensors` checkpoint.
        prefixes: checkpoint prefix → task prefix, e.g. {"model.vlbert.": "vlbert."}.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    targets = module.state_dict()
    ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
    placed: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
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
