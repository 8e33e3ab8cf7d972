"""Read a model folder written by transformers' `save_pretrained`: its config and its tensors.

Shared by the HF converters (`hf_visualbert`, `hf_lxmert`). The folder holds `config.json` and
the weights as `model.safetensors` (preferred), `pytorch_model.bin`, or either one sharded
behind its `.index.json`. A `.bin` file is read with `torch.load(weights_only=True)`, so no
pickled code runs. Nothing here knows a model: the converters map the keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from vlblocks.train.checkpoint import CheckpointError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_FILE, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def read_hf_config(directory: str | Path) -> Any:
    """The folder's `config.json` as the transformers config class of its `model_type`
    (e.g. `VisualBertConfig`), defaults filled in.

    Raises:
        CheckpointError: no config.json, not JSON, no or an unknown `model_type`.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a transformers model folder (no {CONFIG_FILE})")
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise CheckpointError(f"{path}: no 'model_type' field, so the model it describes is unknown")
    from transformers import AutoConfig  # heavy: imported only when converting

    try:
        return AutoConfig.for_model(**fields)
    except (ValueError, TypeError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a config this transformers can read (model_type {fields['model_type']!r}: {first})") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises almost anything
        first = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(error).__name__}: {first})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found a {type(loaded).__name__}")
    return loaded


def _shard_files(index: Path) -> list[Path]:
    """The shard files an `.index.json` names, each once, in order of first appearance."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index}: not a shard index (a JSON object with a 'weight_map'): {error}") from None
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard files that are not there: {', '.join(missing)}")
    return [index.parent / name for name in names]


def read_hf_weights(directory: str | Path) -> tuple[dict[str, Tensor], Path]:
    """Every tensor of the folder's weights and the file (or index) they came from.

    Raises:
        CheckpointError: no weights file, an unreadable one, a key in two shards, or values that
            are not tensors.
    """
    directory = Path(directory)
    for single, index, read in ((SAFETENSORS_FILE, SAFETENSORS_INDEX, _read_safetensors), (TORCH_FILE, TORCH_INDEX, _read_torch)):
        if (directory / single).is_file():
            source, state = directory / single, read(directory / single)
            break
        if (directory / index).is_file():
            source, state = directory / index, {}
            for shard in _shard_files(directory / index):
                part = read(shard)
                repeated = sorted(state.keys() & part.keys())
                if repeated:
                    raise CheckpointError(f"{shard}: holds {', '.join(repeated[:4])}, already read from another shard")
                state.update(part)
            break
    else:
        raise CheckpointError(f"{directory}: no weights ({SAFETENSORS_FILE}, {TORCH_FILE} or a sharded index of either)")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: holds values that are not tensors at {', '.join(not_tensors[:4])}")
    return state, source


def read_hf_directory(directory: str | Path) -> tuple[Any, dict[str, Tensor]]:
    """(config, tensors) of a folder written by `save_pretrained`: the transformers config of
    its `model_type` and the state dict under the saved names (tied copies that the writer left
    out stay out).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    config = read_hf_config(directory)
    state, _ = read_hf_weights(directory)
    return config, state
