"""Start the end-to-end visual front end (ResNet C4 backbone + dilated C5 RoI head) from a local ResNet file.

Three layouts are read, recognised from the file's content (not its name):

- the official VL-BERT detector weights, `resnet101-pt-vgbua-0000.model` (the Visual Genome
  bottom-up-attention Faster R-CNN, converted from caffe): a flat PyTorch state dict with
  torchvision's key names and no classifier. As the official `common/fast_rcnn.py` does,
  `conv1`, `bn1`, `layer1`-`layer3` go to the backbone and `layer4.*` (prefix stripped) to the
  RoI head; BatchNorm affine terms and running statistics come from the file. Caffe-style: the
  stride sits on each block's first 1x1 conv (`IMAGE_STRIDE_IN_1x1: true`).
- a torchvision ImageNet `resnet101-*.pth`: the same key names plus the ImageNet classifier
  `fc.weight` / `fc.bias`, which has no place here and is reported as left out. The stride sits
  on the 3x3 conv, and the input is RGB in [0, 1] normalised by ImageNet's mean and std.
- a detectron / caffe2 `R-101.pkl`: `{'blobs': {name: ndarray}}` or the plain name -> ndarray
  dict, read with `safe_load_array_pickle` (no pickled code runs). Names map as
  `conv1_w` -> `conv1.weight`, `res_conv1_bn_{s,b}` -> `bn1.{weight,bias}`,
  `res{S}_{i}_branch2{a,b,c}_w` -> `layer{S-1}.{i}.conv{1,2,3}.weight` (`_bn_s` / `_bn_b` ->
  `bn{1,2,3}`), `res{S}_{i}_branch1_*` -> `layer{S-1}.{i}.downsample.{0,1}`; `fc1000_*` (the
  ImageNet classifier) and the `*_momentum` solver blobs are reported as left out. Caffe2's
  AffineChannel has a scale `s` and a shift `b` and no running statistics: each becomes a
  BatchNorm with weight `s`, bias `b`, running mean 0 and running variance `1 - eps`, so that
  the frozen BatchNorm computes exactly `s * x + b` (with variance 1 it would scale by
  `1 / sqrt(1 + eps)`). `_bn_rm` / `_bn_riv` blobs, where a file has them, are the running mean
  and variance (detectron2's reading). Caffe-style strides, BGR 0-255 input.

The load is strict: every tensor of the file lands on a parameter or buffer of the same shape
or is named as left out on purpose, and every parameter and buffer of the backbone and head
receives one (`num_batches_tracked` excepted: files predating it leave it at 0, as PyTorch does).
Anything else raises a `CheckpointError` naming the file and the tensors, and nothing is copied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlblocks.data.errors import DataError
from vlblocks.data.formats.array_pickle import safe_load_array_pickle
from vlblocks.train.checkpoint import CheckpointError

VGBUA = "official VL-BERT vgbua"
TORCHVISION = "torchvision ImageNet"
DETECTRON = "detectron/caffe2"
STRIDE_IN_1X1 = {VGBUA: True, TORCHVISION: False, DETECTRON: True}  # where each layout's stride sits
TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")
DETECTRON_CLASSIFIER = ("fc1000_w", "fc1000_b")
BATCHNORM_EPS = 1e-5  # nn.BatchNorm2d's default, which the ResNet blocks use
HEAD_PREFIX = "layer4."  # the file's layer4 is the RoI head
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickled value of a pre-1.6 torch.save file
_DETECTRON_STEM = re.compile(r"^(conv1_w|res_conv1_bn_(s|b|rm|riv))$")
_DETECTRON_BLOCK = re.compile(r"^res([2-5])_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b|bn_rm|bn_riv)$")
_BRANCH = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"), "1": ("downsample.0", "downsample.1")}
_BN_SUFFIX = {"bn_s": "weight", "bn_b": "bias", "bn_rm": "running_mean", "bn_riv": "running_var"}
_SHOWN = 6  # names shown in an error before "and N more"


@dataclass
class ResNetFile:
    """A ResNet file's tensors under torchvision's names (`conv1.weight`, `layer4.2.bn3.bias`...)."""

    path: Path
    layout: str
    tensors: dict[str, Tensor]
    left_out: list[str] = field(default_factory=list)  # source names dropped on purpose
    affine_only: list[str] = field(default_factory=list)  # BatchNorms given scale and shift only


@dataclass
class ResNetLoadReport:
    """What `load_resnet_weights` placed and what it left out on purpose."""

    path: Path
    layout: str
    placed: int
    left_out: list[str]
    affine_only: int

    def __str__(self) -> str:
        lines = [f"loaded {self.placed} tensors from {self.path} ({self.layout} layout) into the ResNet backbone and RoI head"]
        if self.left_out:
            lines.append(f"  left out on purpose (classifier, solver state): {', '.join(self.left_out)}")
        if self.affine_only:
            lines.append(f"  {self.affine_only} caffe2 affine BatchNorms: running mean 0 and variance 1 - eps set")
        return "\n".join(lines)


def load_resnet_weights(backbone: nn.Module, roi_head: nn.Module, path: str | Path) -> ResNetLoadReport:
    """Copy a ResNet file's stem and layer1-3 into `backbone` and its layer4 into `roi_head`.

    Args:
        backbone: a `ResNetC4Backbone` (torchvision key names; its `stride_in_1x1` must match the file's).
        roi_head: a `DilatedC5RoIHead` (keys `0.conv1.weight`, ...: layer4 without its prefix).
        path: the file, in any of the layouts this module reads.

    Raises:
        CheckpointError: unreadable file, unknown layout, stride placement that differs from the
            file's, or a tensor missing, unexpected or of the wrong shape; names the file.
    """
    weights = read_resnet_file(path)
    check_stride_placement(backbone, weights)
    targets = {**backbone.state_dict(keep_vars=True), **{HEAD_PREFIX + k: v for k, v in roi_head.state_dict(keep_vars=True).items()}}
    check_coverage(weights, {name: tuple(t.shape) for name, t in targets.items()})
    with torch.no_grad():
        for name, tensor in weights.tensors.items():
            targets[name].copy_(tensor)
    return ResNetLoadReport(weights.path, weights.layout, len(weights.tensors), weights.left_out, len(weights.affine_only))


def check_stride_placement(backbone: nn.Module, weights: ResNetFile) -> None:
    """The backbone must put its strides where the file's network did (1x1 conv or 3x3 conv)."""
    expected = STRIDE_IN_1X1[weights.layout]
    if getattr(backbone, "stride_in_1x1", expected) != expected:
        conv = "first 1x1" if expected else "3x3"
        raise CheckpointError(
            f"{weights.path}: {weights.layout} weights put each block's stride on its {conv} conv; "
            f"bind ResNetC4Backbone.stride_in_1x1 = {expected}"
        )


def check_coverage(weights: ResNetFile, target_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every file tensor has a target of its shape, and every target but `num_batches_tracked` a tensor."""
    unexpected = [name for name in weights.tensors if name not in target_shapes]
    missing = [name for name in target_shapes if name not in weights.tensors and not name.endswith("num_batches_tracked")]
    mismatched = [
        f"{name} {list(weights.tensors[name].shape)} (the model has {list(shape)})"
        for name, shape in target_shapes.items()
        if name in weights.tensors and tuple(weights.tensors[name].shape) != shape
    ]
    problems = [
        f"{label}: {_names(names)}"
        for label, names in (("not in the model", unexpected), ("missing from the file", missing), ("wrong shape", mismatched))
        if names
    ]
    if problems:
        raise CheckpointError(f"{weights.path} ({weights.layout} layout) does not fit the ResNet backbone and RoI head: " + "; ".join(problems))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def read_resnet_file(path: str | Path) -> ResNetFile:
    """The file's tensors under torchvision names, its layout recognised from its content."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ResNet weights file")
    if _is_torch_file(path):
        return _torch_layout(path, _read_torch(path))
    try:
        loaded = safe_load_array_pickle(path)
    except DataError as error:
        raise CheckpointError(
            f"{path}: unknown ResNet weights layout: neither a PyTorch file nor a detectron pickle ({error})"
        ) from None
    return _detectron_layout(path, loaded)


def _is_torch_file(path: Path) -> bool:
    """A `torch.save` file: a zip archive (PyTorch >= 1.6) or a pickle opening with torch's magic number."""
    with path.open("rb") as handle:
        head = handle.read(14)
    legacy = head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == _TORCH_LEGACY_MAGIC
    return head[:4] == b"PK\x03\x04" or legacy


def _read_torch(path: Path) -> dict[str, Tensor]:
    """A PyTorch file's flat name -> tensor dict, read without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated archive, refused global, ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch file ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        keys = list(state)[:_SHOWN] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: unknown ResNet weights layout: not a flat name -> tensor state dict (holds {keys})")
    return state


def _torch_layout(path: Path, state: dict[str, Tensor]) -> ResNetFile:
    """torchvision names: with the `fc` classifier a torchvision ImageNet file, without it the vgbua file."""
    if "conv1.weight" not in state or not any(name.startswith("layer1.") for name in state):
        raise CheckpointError(
            f"{path}: unknown ResNet weights layout: no conv1.weight / layer1.* (keys: {_names(list(state))}); "
            "expected the official resnet101-pt-vgbua, a torchvision resnet101-*.pth or a detectron R-101.pkl"
        )
    classifier = [name for name in TORCHVISION_CLASSIFIER if name in state]
    tensors = {name: tensor for name, tensor in state.items() if name not in classifier}
    return ResNetFile(path, TORCHVISION if classifier else VGBUA, tensors, left_out=classifier)


def detectron_name(name: str) -> str | None:
    """The torchvision name of a detectron blob (`res4_22_branch2c_bn_s` -> `layer3.22.bn3.weight`), None if it has none."""
    if _DETECTRON_STEM.match(name):
        return "conv1.weight" if name == "conv1_w" else "bn1." + _BN_SUFFIX[name[len("res_conv1_") :]]
    match = _DETECTRON_BLOCK.match(name)
    if match is None:
        return None
    stage, block, branch, suffix = match.groups()
    conv, norm = _BRANCH[branch]
    prefix = f"layer{int(stage) - 1}.{int(block)}."
    return prefix + (f"{conv}.weight" if suffix == "w" else f"{norm}.{_BN_SUFFIX[suffix]}")


def _detectron_blobs(path: Path, loaded: Any) -> tuple[dict[str, Any], list[str]]:
    """The name -> array blobs of a detectron pickle and the wrapper's other top-level keys."""
    if isinstance(loaded, dict) and isinstance(loaded.get("blobs"), dict):
        return loaded["blobs"], sorted(str(key) for key in loaded if key != "blobs")
    if isinstance(loaded, dict) and "conv1_w" in loaded:
        return loaded, []
    keys = _names([str(key) for key in loaded]) if isinstance(loaded, dict) else type(loaded).__name__
    raise CheckpointError(
        f"{path}: unknown ResNet weights layout: a pickle with neither 'blobs' nor 'conv1_w' (holds {keys}); "
        "expected a detectron R-101.pkl"
    )


def _detectron_layout(path: Path, loaded: Any) -> ResNetFile:
    """Detectron blobs renamed to torchvision names; affine-only BatchNorms get neutral statistics."""
    blobs, left_out = _detectron_blobs(path, loaded)
    tensors: dict[str, Tensor] = {}
    unknown = []
    for name, value in blobs.items():
        if name.endswith("_momentum") or name in DETECTRON_CLASSIFIER:
            left_out.append(name)
            continue
        target = detectron_name(name)
        if target is None or not isinstance(value, np.ndarray):
            unknown.append(name)
            continue
        tensors[target] = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    if unknown:
        raise CheckpointError(f"{path} ({DETECTRON} layout): blobs with no place in a ResNet: {_names(unknown)}")
    affine_only = _add_neutral_statistics(tensors)
    return ResNetFile(path, DETECTRON, tensors, left_out=left_out, affine_only=affine_only)


def _add_neutral_statistics(tensors: dict[str, Tensor]) -> list[str]:
    """For each BatchNorm with weight and bias but no running statistics: mean 0, variance 1 - eps.

    Returns the BatchNorm prefixes completed (`bn1.`, `layer1.0.downsample.1.`, ...).
    """
    completed = []
    for name in [n for n in tensors if n.endswith(".bias") and n[: -len("bias")] + "weight" in tensors]:
        prefix = name[: -len("bias")]
        if prefix + "running_mean" in tensors or prefix + "running_var" in tensors:
            continue  # a file with statistics: a missing half is reported by the strict check
        channels = tensors[name].shape
        tensors[prefix + "running_mean"] = torch.zeros(channels, dtype=torch.float32)
        tensors[prefix + "running_var"] = torch.full(channels, 1.0 - BATCHNORM_EPS, dtype=torch.float32)
        completed.append(prefix)
    return completed
