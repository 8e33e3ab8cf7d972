"""A recipe's model as a tree with parameter counts and per-sample multiply-adds (fvcore)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.region_features import EndToEndRegionFeatures, PrecomputedRegionFeatures
from vlblocks.models.interface import VLModel

EXAMPLE_SEED = 0  # the random sample that multiply-adds are counted on
WRAPPER = "model"  # the model's name inside the tracing wrapper, in fvcore's module names
MAC_HEADING = "multiply-adds (MACs)"
COUNTING_NOTE = (
    "counted by fvcore, whose 'flop' is one multiply-add in matrix products and convolutions (5 per element of a LayerNorm);"
    " elementwise ops, softmax and RoI pooling are not counted; '-': not called on this sample"
)


@dataclass
class ExampleShape:
    """The sample that multiply-adds are counted on: text tokens, regions (whole image included), image size."""

    text_length: int = 32
    regions: int = 36
    image_height: int = 600
    image_width: int = 800
    mask_fraction: float = 0.15


def example_batch(model: nn.Module, shape: ExampleShape) -> VLBatch:
    """One random sample of the given size in the form `model` reads (features or pixels)."""
    core = next(m for m in model.modules() if isinstance(m, VLModel))
    generator = torch.Generator().manual_seed(EXAMPLE_SEED)
    length, regions = shape.text_length, shape.regions
    corners = torch.rand(1, regions, 2, generator=generator) * torch.tensor([shape.image_width, shape.image_height]) / 2
    sizes = torch.rand(1, regions, 2, generator=generator) * torch.tensor([shape.image_width, shape.image_height]) / 2 + 1
    boxes = torch.cat([corners, corners + sizes], -1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, shape.image_width - 1.0, shape.image_height - 1.0])
    masked_tokens = max(1, round(shape.mask_fraction * length))
    masked_regions = torch.zeros(1, regions, dtype=torch.bool)
    masked_regions[0, 1 : 1 + max(1, round(shape.mask_fraction * (regions - 1)))] = True
    mlm_labels = torch.full((1, length), -1)
    mlm_labels[0, 1 : 1 + masked_tokens] = 5
    batch = dict(
        text_ids=torch.randint(1, core.word_embeddings.num_embeddings, (1, length), generator=generator),
        segment_ids=torch.zeros(1, length, dtype=torch.long),
        text_mask=torch.ones(1, length, dtype=torch.bool),
        boxes=boxes,
        region_mask=torch.ones(1, regions, dtype=torch.bool),
        image_sizes=torch.tensor([[float(shape.image_width), float(shape.image_height)]]),
        masked_regions=masked_regions,
        mlm_labels=mlm_labels,
        answer_positions=torch.tensor([length - 2]),  # VQA's answer slot, the token before the last [SEP]
    )
    for module in model.modules():
        if isinstance(module, EndToEndRegionFeatures):
            batch["images"] = torch.randn(1, 3, shape.image_height, shape.image_width, generator=generator)
        if isinstance(module, PrecomputedRegionFeatures):
            batch["region_features"] = torch.randn(1, regions, module.out_features, generator=generator)
    return VLBatch(**batch)


class _BatchFromTensors(nn.Module):
    """Lets fvcore's tracer, which passes tensors only, call a model that takes a `VLBatch`."""

    def __init__(self, model: nn.Module, field_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.field_names = field_names

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        output = self.model(VLBatch(**dict(zip(self.field_names, tensors))))
        return tuple(_tensors_in(output))


def _tensors_in(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):  # e.g. the region prediction head's outputs, else traced away uncounted
        for item in value.values():
            yield from _tensors_in(item)


def _attention_macs(inputs: list, outputs: list) -> int:
    """Multiply-adds of scaled_dot_product_attention (fvcore has no handle for it): QK^T and PV."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(inputs[i]) for i in range(3))
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def count_multiply_adds(model: nn.Module, batch: VLBatch):
    """fvcore's analysis of one forward on `batch`, with attention counted; module names start with `model.`."""
    from fvcore.nn import FlopCountAnalysis

    names = [f.name for f in fields(batch) if getattr(batch, f.name) is not None]
    analysis = FlopCountAnalysis(_BatchFromTensors(model, names), tuple(getattr(batch, name) for name in names))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        analysis.total()
    return analysis


@dataclass
class TreeRow:
    """One shown module: its depth below the root (1 = a child of the model), its name relative
    to the shown parent, class, parameters and multiply-adds (None: not called on the sample)."""

    depth: int
    name: str
    kind: str
    parameters: int
    multiply_adds: Optional[int]


def shown_modules(model: nn.Module, max_depth: int) -> list[tuple[str, int, str]]:
    """(full name, depth, name relative to the shown parent) of the modules down to `max_depth`,
    in definition order. A ModuleList or ModuleDict has no forward of its own: its children are
    shown in its place, named 'layer.0', 'layer.1', ..."""
    shown: list[tuple[str, int, str]] = []

    def visit(module: nn.Module, prefix: str, depth: int, relative_prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child, f"{full}.", depth, f"{relative_prefix}{name}.")
            elif depth <= max_depth:
                shown.append((full, depth, f"{relative_prefix}{name}"))
                visit(child, f"{full}.", depth + 1, "")

    visit(model, "", 1, "")
    return shown


def owned_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter name → size, each shared tensor counted once, under its first name."""
    return {name: parameter.numel() for name, parameter in model.named_parameters()}


def shared_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(later name, first name) of every parameter reachable under two names (tied weights)."""
    first: dict[int, str] = {}
    pairs = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            pairs.append((name, first[id(parameter)]))
        else:
            first[id(parameter)] = name
    return pairs


def tree_rows(model: nn.Module, analysis, max_depth: int) -> list[TreeRow]:
    """The rows of the module tree, from `count_multiply_adds`'s analysis; modules with neither
    parameters nor counted operations (dropout, activations) are left out."""
    owned = owned_parameter_counts(model)
    by_module = analysis.by_module()
    uncalled = set(analysis.uncalled_modules())
    rows = []
    for full, depth, name in shown_modules(model, max_depth):
        parameters = sum(size for key, size in owned.items() if key.startswith(f"{full}."))
        traced = f"{WRAPPER}.{full}"
        multiply_adds = None if traced in uncalled and not by_module.get(traced) else int(by_module.get(traced, 0))
        if parameters or multiply_adds:
            rows.append(TreeRow(depth, name, type(model.get_submodule(full)).__name__, parameters, multiply_adds))
    return rows


def format_count(count: Optional[float]) -> str:
    """A multiply-add count with a K/M/G/T suffix and two decimals; '-' for None."""
    if count is None:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)}"


def format_tree(rows: list[TreeRow], root: str, parameters: int, multiply_adds: int) -> str:
    """The indented tree as a text table (two spaces per level) ending with the total row."""
    header = ("module", "parameters", MAC_HEADING)
    body = [(f"{'  ' * (row.depth - 1)}{row.name} ({row.kind})", f"{row.parameters:,}", format_count(row.multiply_adds)) for row in rows]
    total = (f"total ({root})", f"{parameters:,}", format_count(multiply_adds))
    widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(3)]

    def line(cells: tuple[str, str, str]) -> str:
        return f"{cells[0].ljust(widths[0])}  {cells[1].rjust(widths[1])}  {cells[2].rjust(widths[2])}"

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(cells) for cells in body), rule, line(total)])


def describe(model: nn.Module, shape: Optional[ExampleShape] = None, max_depth: int = 3) -> str:
    """The module tree down to `max_depth` levels, with parameters and per-sample multiply-adds
    (MACs) per module, a total row, and the sample and counting conventions."""
    shape = shape or ExampleShape()
    model = model.eval()
    batch = example_batch(model, shape)
    analysis = count_multiply_adds(model, batch)
    total = int(analysis.total(WRAPPER))
    parameters = sum(owned_parameter_counts(model).values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_sample = (
        f"per sample: {shape.text_length} text tokens, {shape.regions} regions"
        + (f", a {shape.image_height}x{shape.image_width} image" if batch.images is not None else "")
        + f", {shape.mask_fraction:.0%} of tokens and regions masked"
    )
    lines = [
        format_tree(tree_rows(model, analysis, max_depth), type(model).__name__, parameters, total),
        "",
        per_sample,
        f"parameters: {parameters:,} ({trainable:,} trainable, {parameters - trainable:,} frozen)",
        f"multiply-adds (MACs) per sample: {format_count(total)} (about {format_count(2 * total)} FLOPs at 2 FLOPs per multiply-add)",
        COUNTING_NOTE,
    ]
    lines += [f"{later} is tied to {first} (counted once, there)" for later, first in shared_parameters(model)]
    return "\n".join(lines)
