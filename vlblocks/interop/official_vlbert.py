"""Convert checkpoints written by the official VL-BERT code (jackroos/VL-BERT) into vlblocks weights.

The official trainer saves `torch.save({'state_dict': net.state_dict(), 'optimizer': ...,
'validation_monitor': ...})` (common/callbacks/epoch_end_callbacks/checkpoint.py); the released
`vl-bert-{base,large}-{prec,e2e}.model` files and the VQA / VCR / RefCOCO+ fine-tuned ones have
that layout. Only `state_dict` is used. Its names are those of the official modules:

| official (after `module.` / `vlbert._module.` are stripped) | vlblocks (C = the `VLBert`'s prefix) |
|---|---|
| `vlbert.word_embeddings`, `.end_embedding`, `.position_embeddings`, `.token_type_embeddings` | `C.embedding.<same>` |
| `vlbert.embedding_LayerNorm` | `C.embedding.LayerNorm` |
| `vlbert.visual_1x1_text` / `visual_1x1_object` | `C.embedding.visual_text.projection` / `visual_region.projection` |
| `vlbert.visual_ln_text` / `visual_ln_object` | `C.embedding.visual_text.LayerNorm` / `visual_region.LayerNorm` |
| `vlbert.visual_scale_text` / `visual_scale_object` (0-d) | `C.embedding.visual_text.scale` / `visual_region.scale` ([1]) |
| `vlbert.encoder`, `vlbert.pooler` | `C.encoder`, `C.pooler` |
| `object_linguistic_embeddings` ([IMG] word, 1 row) | `C.embedding.image_token` |
| `object_mask_word_embedding` (masked-region word) | `C.embedding.masked_region_token` |
| `image_feature_extractor.obj_downsample.1` | `C.visual_embedding.projection` |
| `image_feature_extractor.backbone` (conv1, bn1, layer1-3) | `C.region_features.backbone` |
| `image_feature_extractor.roi_head_feature_extractor` (layer4) | `C.region_features.roi_head` |
| `vlbert.mlm_head.predictions.transform` / `.bias` | `P.mlm_head.transform` / `P.mlm_head.bias` |
| `vlbert.mvrc_head.transform` / `.region_cls_pred` | `P.region_head.transform` / `.region_cls_pred` |
| `vlbert.relationsip_head.caption_image_relationship` | `P.relation_head.classifier` |
| `aux_text_visual_embedding` (text-only stream's visual feature) | `<...>.aux_text_visual_embedding` |
| `object_mask_visual_embedding` (precomputed mask feature) | `<...>.mask_feature` |
| `final_mlp.0` (VQA's MLM transform, RefCOCO+'s MVRC transform) | `head.transform` |
| `final_mlp.2` (VQA, RefCOCO+), `final_mlp.1` (VCR `1fc`) | `head.classifier` |
| `cnn_loss_reg.0` / `cnn_loss_reg.2` (VCR) | `region_head.transform` / `region_head.classifier` |

P is the `VLBertForPretraining`'s prefix (`model.` in a `PretrainingTask`). Dropped on purpose,
after a check: `image_feature_extractor.head.0.*` (the same layer4 modules as
`roi_head_feature_extractor`, stored twice: they must be equal) and
`vlbert.mlm_head.predictions.decoder.weight` (tied to the word embeddings: it must equal them).
Everything else must find its place with its shape, or nothing is converted and a
`CheckpointError` names the tensor; so must every vlblocks tensor be covered, except the
fine-tuning models' unused masked-region word (the official fine-tuning modules have none: it is
set to 0) and BatchNorm counters missing from old files (set to 0). Floating tensors take the
target's dtype (the large models' fp16 becomes float32).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.vlbert import VLBert
from vlblocks.train.checkpoint import CheckpointError

DUPLICATE_LAYER4 = ("image_feature_extractor.head.0.", "image_feature_extractor.roi_head_feature_extractor.")
TIED_DECODER = ("vlbert.mlm_head.predictions.decoder.weight", "vlbert.word_embeddings.weight")
ZERO_D_SCALES = ("vlbert.visual_scale_text", "vlbert.visual_scale_object")
# Official tensors vlblocks does not implement, with what to do about them.
UNSUPPORTED = {
    "vlbert.special_word_embeddings.": "the checkpoint was trained with word_embedding_frozen, which vlblocks does not implement",
    "image_feature_extractor.object_embed.": "the checkpoint was trained with IMAGE_SEMANTIC (class embeddings of regions), which vlblocks does not implement",
    "image_feature_extractor.regularizing_predictor.": "the checkpoint has the CNN regularising classifier below the Transformer (CNN_LOSS_TOP false), which vlblocks does not implement",
}
# Where a missing target name most likely comes from a recipe that differs from the official config.
HINTS = {
    "vlbert.visual_scale_text": "the checkpoint uses scalar visual scales (visual_ln false): bind VLEmbedding.visual_layer_norm = False",
    "vlbert.visual_ln_text.": "the checkpoint uses visual LayerNorms (visual_ln true): bind VLEmbedding.visual_layer_norm = True",
    "vlbert.pooler.": "the checkpoint has a pooler (with_pooler true): bind VLBert.pooler = @Pooler()",
    "image_feature_extractor.backbone.": "the checkpoint is end to end: use a recipe with the ResNet-101 front end (not features/precomputed.gin)",
    "image_feature_extractor.roi_head_feature_extractor.": "the checkpoint is end to end: use a recipe with the ResNet-101 front end (not features/precomputed.gin)",
    "object_mask_visual_embedding.": "the checkpoint masks precomputed features: bind MaskedRegionClassification.precomputed_feature_size = 2048",
    "aux_text_visual_embedding.": "the checkpoint has the text-only stream: use a recipe whose PretrainingTask.objectives hold a TextOnlyMaskedLM, or --ignore aux_text_visual_embedding",
    "vlbert.mlm_head.": "this is a pre-training checkpoint: convert it with a pre-training recipe and start fine-tuning from it with experiment.pretrained",
    "vlbert.mvrc_head.": "this is a pre-training checkpoint: convert it with a pre-training recipe and start fine-tuning from it with experiment.pretrained",
}


def _numpy_scalar_globals() -> list:
    """The numpy constructors that a weights-only load may call to rebuild plain numpy scalars
    (the official `validation_monitor` stores its best score as one); they build numbers, never
    run other code."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtype_classes]


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The `state_dict` of an official `.model` file (or a bare state dict saved with torch.save),
    read with `weights_only=True` so nothing pickled runs.

    Raises:
        CheckpointError: missing file, not a PyTorch file (e.g. truncated), objects a weights-only
            load refuses, no `state_dict`, or non-tensor values in it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused is None:  # not a pickle of ours at all (a foreign or damaged file)
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (UnpicklingError)") from None
        raise CheckpointError(
            f"{path}: holds pickled objects other than tensors and plain data ({refused.group(1)}), "
            "which a weights-only load refuses; nothing pickled is run"
        ) from None
    except Exception as error:  # a truncated or foreign file raises almost anything
        first = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {first})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected the official layout, a dict with a 'state_dict' of tensors")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: 'state_dict' holds non-tensor values at {', '.join(not_tensors[:4])}")
    return state


def strip_wrappers(key: str) -> str:
    """The official name without its wrappers: DDP's leading `module.` and VCR's
    `TimeDistributed` (`vlbert._module.` → `vlbert.`)."""
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("vlbert._module."):
        key = "vlbert." + key[len("vlbert._module.") :]
    return key


def module_prefix(model: nn.Module, kind: type) -> Optional[str]:
    """The state-dict prefix of the first submodule of type `kind` ('' for the model itself), or None."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            return f"{name}." if name else ""
    return None


def _suffix_target(names: Sequence[str], suffix: str) -> Optional[str]:
    """The one target name ending with `suffix` (e.g. the text-only stream's embedding), or None."""
    found = [name for name in names if name == suffix or name.endswith("." + suffix)]
    return found[0] if len(found) == 1 else None


def mapping_rules(model: nn.Module) -> list[tuple[str, str]]:
    """(official prefix, target prefix) pairs for `model`, longest official prefix first.

    An official prefix ending with '.' renames every key under it; one without renames that key."""
    core = module_prefix(model, VLBert)
    if core is None:
        raise CheckpointError(f"{type(model).__name__} holds no VLBert: nothing to convert official VL-BERT weights into")
    embedding = core + "embedding."
    rules = [
        ("vlbert.word_embeddings.", embedding + "word_embeddings."),
        ("vlbert.end_embedding.", embedding + "end_embedding."),
        ("vlbert.position_embeddings.", embedding + "position_embeddings."),
        ("vlbert.token_type_embeddings.", embedding + "token_type_embeddings."),
        ("vlbert.embedding_LayerNorm.", embedding + "LayerNorm."),
        ("vlbert.visual_1x1_text.", embedding + "visual_text.projection."),
        ("vlbert.visual_1x1_object.", embedding + "visual_region.projection."),
        ("vlbert.visual_ln_text.", embedding + "visual_text.LayerNorm."),
        ("vlbert.visual_ln_object.", embedding + "visual_region.LayerNorm."),
        ("vlbert.visual_scale_text", embedding + "visual_text.scale"),
        ("vlbert.visual_scale_object", embedding + "visual_region.scale"),
        ("vlbert.encoder.", core + "encoder."),
        ("vlbert.pooler.", core + "pooler."),
        ("object_linguistic_embeddings.", embedding + "image_token."),
        ("object_mask_word_embedding.", embedding + "masked_region_token."),
        ("image_feature_extractor.obj_downsample.1.", core + "visual_embedding.projection."),
        ("image_feature_extractor.backbone.", core + "region_features.backbone."),
        ("image_feature_extractor.roi_head_feature_extractor.", core + "region_features.roi_head."),
        ("final_mlp.0.", "head.transform."),
        ("final_mlp.1.", "head.classifier."),
        ("final_mlp.2.", "head.classifier."),
        ("cnn_loss_reg.0.", "region_head.transform."),
        ("cnn_loss_reg.2.", "region_head.classifier."),
    ]
    heads = module_prefix(model, VLBertForPretraining)
    if heads is not None:
        rules += [
            ("vlbert.mlm_head.predictions.transform.", heads + "mlm_head.transform."),
            ("vlbert.mlm_head.predictions.bias", heads + "mlm_head.bias"),
            ("vlbert.mvrc_head.transform.", heads + "region_head.transform."),
            ("vlbert.mvrc_head.region_cls_pred.", heads + "region_head.region_cls_pred."),
            ("vlbert.relationsip_head.caption_image_relationship.", heads + "relation_head.classifier."),
        ]
    names = list(model.state_dict())
    for official, suffix in (("aux_text_visual_embedding.weight", "aux_text_visual_embedding.weight"), ("object_mask_visual_embedding.weight", "mask_feature")):
        target = _suffix_target(names, suffix)
        if target is not None:
            rules.append((official, target))
    return sorted(rules, key=lambda rule: -len(rule[0]))


def target_name(key: str, rules: Sequence[tuple[str, str]]) -> Optional[str]:
    """Where an official (unwrapped) key goes under `rules`, or None."""
    for official, target in rules:
        if official.endswith(".") and key.startswith(official):
            return target + key[len(official) :]
        if key == official:
            return target
    return None


@dataclass
class OfficialConversion:
    """A converted state dict and what the conversion did.

    `weights`: every name of the target's `state_dict()` (tied names share one tensor).
    `checked`: official tensors dropped after their equality check. `zeroed`: target tensors the
    official file cannot hold, set to 0. `half`: how many fp16 tensors became the target's dtype."""

    source: str
    weights: dict[str, Tensor] = field(default_factory=dict)
    placed: int = 0
    checked: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    zeroed: list[str] = field(default_factory=list)
    half: int = 0

    def __str__(self) -> str:
        lines = [f"converted {self.placed} tensors from {self.source}"]
        if self.half:
            lines.append(f"  {self.half} fp16 tensors converted to float32")
        if self.checked:
            lines.append(f"  dropped after checking they equal the tensors kept: {len(self.checked)} (the second copy of layer4, the tied MLM decoder)")
        if self.ignored:
            lines.append(f"  dropped on request: {', '.join(self.ignored)}")
        if self.zeroed:
            lines.append(f"  not in the official model, set to 0: {', '.join(self.zeroed)}")
        return "\n".join(lines)


def _unwrapped(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state dict under unwrapped names; two keys that unwrap to one name are an error."""
    unwrapped: dict[str, Tensor] = {}
    for key, value in state.items():
        name = strip_wrappers(key)
        if name in unwrapped:
            raise CheckpointError(f"{source}: '{key}' and another key both name '{name}'")
        unwrapped[name] = value
    return unwrapped


def _drop_checked_copies(state: dict[str, Tensor], source: str, report: OfficialConversion) -> None:
    """Remove the second layer4 copy and the tied decoder from `state`, after checking each
    equals the tensor kept."""
    copy, kept = DUPLICATE_LAYER4
    pairs = [(key, kept + key[len(copy) :]) for key in state if key.startswith(copy)]
    if TIED_DECODER[0] in state:
        pairs.append(TIED_DECODER)
    for key, original in pairs:
        if original not in state:
            raise CheckpointError(f"{source}: '{key}' is there but '{original}', which it must equal, is not")
        if state[key].shape != state[original].shape or not torch.equal(state[key], state[original]):
            raise CheckpointError(f"{source}: '{key}' differs from '{original}'; the official model holds them as one tensor")
        del state[key]
        report.checked.append(key)


def _fitted(value: Tensor, key: str, name: str, target: Tensor, source: str) -> Tensor:
    """`value` in the target's dtype and shape (a 0-d scale becomes [1]), or an error naming both."""
    if key in ZERO_D_SCALES and value.dim() == 0:
        value = value.reshape(1)
    if tuple(value.shape) != tuple(target.shape):
        raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)}, {name} needs {tuple(target.shape)}")
    if value.is_floating_point() != target.is_floating_point():
        raise CheckpointError(f"{source}: '{key}' is {value.dtype}, {name} is {target.dtype}")
    return value.to(target.dtype).clone()


def _no_place(key: str, model: nn.Module, source: str, name: Optional[str] = None) -> CheckpointError:
    """The error for an official tensor that has no place in `model`, with the likely fix."""
    reason = next((text for prefix, text in UNSUPPORTED.items() if key.startswith(prefix)), None)
    if reason is None:
        reason = next((text for prefix, text in HINTS.items() if key.startswith(prefix)), None)
    where = f"maps to {name}, which {type(model).__name__} does not have" if name else f"has no place in {type(model).__name__}"
    return CheckpointError(f"{source}: '{key}' {where}" + (f": {reason}" if reason else " (pass it to ignore to drop it on purpose)"))


def _zero_fill_allowed(name: str, core: str, pretraining: bool) -> bool:
    """Target tensors an official checkpoint may lack: the masked-region word of a fine-tuning
    model (unused there; the official fine-tuning modules have none) and BatchNorm counters
    (files from PyTorch < 0.4.1; they do not enter the computation)."""
    unused_word = not pretraining and name == core + "embedding.masked_region_token.weight"
    return unused_word or name.endswith(".num_batches_tracked")


def convert_official_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, source: str = "state dict", ignore: Sequence[str] = ()
) -> OfficialConversion:
    """Map an official VL-BERT state dict onto `model`'s names (see the module docstring).

    Args:
        state: the official `state_dict` (with or without `module.` / `_module.`).
        model: the vlblocks task or model to convert for (`PretrainingTask`, `VQATask`, ...).
        source: the file name, for messages.
        ignore: unwrapped official key prefixes to drop on purpose (listed in the report).

    Returns:
        `OfficialConversion` whose `weights` `model.load_state_dict(..., strict=True)` takes.

    Raises:
        CheckpointError: an official tensor with no place or of another shape, a duplicated copy
            that differs, or a target tensor the checkpoint does not cover.
    """
    report = OfficialConversion(source=source)
    unwrapped = _unwrapped(state, source)
    report.ignored = sorted(key for key in unwrapped if any(key.startswith(prefix) for prefix in ignore))
    for key in report.ignored:
        del unwrapped[key]
    _drop_checked_copies(unwrapped, source, report)
    rules = mapping_rules(model)
    targets = model.state_dict(keep_vars=True)
    converted: dict[str, Tensor] = {}
    for key, value in unwrapped.items():
        if any(key.startswith(prefix) for prefix in UNSUPPORTED):
            raise _no_place(key, model, source)
        name = target_name(key, rules)
        if name is None or name not in targets:
            raise _no_place(key, model, source, name)
        converted[name] = _fitted(value, key, name, targets[name], source)
        report.half += int(value.dtype == torch.float16)
    report.placed = len(converted)
    report.weights = _complete(converted, model, source, report)
    return report


def _complete(converted: dict[str, Tensor], model: nn.Module, source: str, report: OfficialConversion) -> dict[str, Tensor]:
    """Every name of `model.state_dict()`: tied names take their partner's tensor, the allowed
    gaps are zero; any other gap is an error naming it."""
    targets = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    core = module_prefix(model, VLBert) or ""
    pretraining = module_prefix(model, VLBertForPretraining) is not None
    weights: dict[str, Tensor] = {}
    missing: list[str] = []
    for names in groups.values():
        given = [name for name in names if name in converted]
        if given:
            for name in names:
                weights[name] = converted[given[0]]
        elif all(_zero_fill_allowed(name, core, pretraining) for name in names):
            for name in names:
                weights[name] = torch.zeros_like(targets[name].detach())
            report.zeroed.extend(names)
        else:
            missing.extend(names)
    if missing:
        shown = ", ".join(sorted(missing)[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise CheckpointError(f"{source} does not cover {type(model).__name__}: no official tensor for {shown}")
    return weights


def load_official_weights(
    model: nn.Module, state: Mapping[str, Tensor], source: str = "state dict", ignore: Sequence[str] = ()
) -> OfficialConversion:
    """Convert an official state dict held in memory and load it into `model`, strictly; on any
    error nothing is loaded. Returns the conversion (its `str` is a short report)."""
    conversion = convert_official_state_dict(state, model, source, ignore)
    model.load_state_dict(conversion.weights, strict=True)
    return conversion


def write_weights_file(model: nn.Module, out: str | Path, metadata: dict[str, str]) -> Path:
    """Write `model`'s weights as one safetensors file (tied tensors once, as `save_checkpoint`
    stores them) through a temporary file renamed into place: a failed write leaves `out` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    try:
        save_model(model, str(temporary), metadata=metadata)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out
