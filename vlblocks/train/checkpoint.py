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

from vlblocks.interop.hf_bert import CheckpointError


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
