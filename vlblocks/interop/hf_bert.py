"""Initialise VL-BERT from a local HF-format BERT directory (config.json + weights)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from vlblocks.train.checkpoint import CheckpointError

HF_BUFFERS = ("embeddings.position_ids",)


@dataclass
class LoadReport:
    """What a strict load did: source keys placed and dropped, target tensors left as initialised."""

    source: str
    placed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.placed)} tensors from {self.source}"]
        if self.ignored:
            lines.append(f"  dropped on request: {', '.join(self.ignored)}")
        for note in self.partial:
            lines.append(f"  partly covered: {note}")
        if self.not_covered:
            lines.append("  left as initialised (the source has no such weights):")
            groups = Counter(".".join(key.split(".")[:3]) for key in self.not_covered)
            for prefix, count in groups.items():
                lines.append(f"    {prefix}" + (f".* ({count} tensors)" if count > 1 or prefix not in self.not_covered else ""))
        return "\n".join(lines)


def read_hf_state_dict(directory: str | Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors of `model.safetensors` (preferred) or `pytorch_model.bin`, read without unpickling code."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not an HF-format model directory (no config.json)")
    safetensors_path, torch_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        return load_file(str(safetensors_path)), safetensors_path
    if torch_path.is_file():
        return torch.load(torch_path, map_location="cpu", weights_only=True), torch_path
    raise CheckpointError(f"{directory}: neither model.safetensors nor pytorch_model.bin is there")


def read_hf_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def normalise_bert_key(key: str) -> str:
    """Strip a `bert.` prefix and rename TF-era `gamma`/`beta` LayerNorm parameters."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def target_name(key: str, core_prefix: str) -> str | None:
    """Where a normalised BERT key goes in a VL-BERT model, or None if it has no place."""
    if key.startswith("embeddings."):
        return core_prefix + "embedding." + key[len("embeddings.") :]
    if key.startswith(("encoder.", "pooler.")):
        return core_prefix + key
    if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        return "mlm_head.bias"
    if key == "cls.predictions.decoder.weight":
        return "mlm_head.decoder.weight"
    if key.startswith("cls.predictions.transform."):
        return "mlm_head.transform." + key[len("cls.predictions.transform.") :]
    return None


def load_bert_weights(model: nn.Module, directory: str | Path, ignore: Sequence[str] = ()) -> LoadReport:
    """Copy BERT's embeddings, encoder, pooler and MLM head into a `VLBert` or `VLBertForPretraining`.

    Strict: every source tensor must find its place with the right shape, unless its key starts
    with one of `ignore` (e.g. `"pooler."` when the model has no pooler); otherwise a
    `CheckpointError` names it, and the model is left untouched. BERT's 2 segment rows fill rows
    0-1 of VL-BERT's 3; row 2 (the visual segment) and everything BERT lacks keep their
    initialisation and are listed in the returned report.
    """
    state, path = read_hf_state_dict(directory)
    core_prefix = "vlbert." if hasattr(model, "vlbert") else ""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    report = LoadReport(source=str(path))
    copies: list[tuple[str, Tensor]] = []
    for raw_key, value in state.items():
        key = normalise_bert_key(raw_key)
        if key in HF_BUFFERS or any(key.startswith(prefix) or raw_key.startswith(prefix) for prefix in ignore):
            report.ignored.append(raw_key)
            continue
        name = target_name(key, core_prefix)
        if name is None or name not in targets:
            raise CheckpointError(f"{path}: key '{raw_key}' has no place in {type(model).__name__} (ignore it explicitly to drop it)")
        target = targets[name]
        rows = value.shape[0] if value.dim() else 0
        partial = key == "embeddings.token_type_embeddings.weight" and rows < target.shape[0] and value.shape[1:] == target.shape[1:]
        if value.shape != target.shape and not partial:
            raise CheckpointError(f"{path}: '{raw_key}' has shape {tuple(value.shape)}, {name} needs {tuple(target.shape)}")
        if partial:
            report.partial.append(f"{name}: rows 0-{rows - 1} from the source, rows {rows}-{target.shape[0] - 1} as initialised")
        copies.append((name, value))
        report.placed.append(raw_key)
    decoder = "mlm_head.decoder.weight"
    tied = dict(copies).get(decoder)
    word_embeddings = dict(copies).get(core_prefix + "embedding.word_embeddings.weight")
    if tied is not None and (word_embeddings is None or not torch.equal(tied, word_embeddings)):
        raise CheckpointError(f"{path}: the MLM decoder weight differs from the word embeddings, but the model ties them")
    with torch.no_grad():
        for name, value in copies:
            targets[name][: value.shape[0]].copy_(value)
    covered_tensors = {id(targets[name]) for name, _ in copies}
    report.not_covered = [name for name, tensor in targets.items() if id(tensor) not in covered_tensors]
    return report
