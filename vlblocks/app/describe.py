"""A recipe's model as a tree with parameter counts and per-sample FLOPs (fvcore)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.region_features import EndToEndRegionFeatures, PrecomputedRegionFeatures

EXAMPLE_SEED = 0  # the random sample that FLOPs are counted on


@dataclass
class ExampleShape:
    """The sample that FLOPs are counted on: text tokens, regions (whole image included), image size."""

    text_length: int = 32
    regions: int = 36
    image_height: int = 600
    image_width: int = 800
    mask_fraction: float = 0.15


def example_batch(model: nn.Module, shape: ExampleShape) -> VLBatch:
    """One random sample of the given size in the form `model` reads (features or pixels)."""
    embedding = next(m for m in model.modules() if isinstance(m, VLEmbedding))
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
        text_ids=torch.randint(1, embedding.word_embeddings.num_embeddings, (1, length), generator=generator),
        segment_ids=torch.zeros(1, length, dtype=torch.long),
        text_mask=torch.ones(1, length, dtype=torch.bool),
        boxes=boxes,
        region_mask=torch.ones(1, regions, dtype=torch.bool),
        image_sizes=torch.tensor([[float(shape.image_width), float(shape.image_height)]]),
        masked_regions=masked_regions,
        mlm_labels=mlm_labels,
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


def _attention_macs(inputs: list, outputs: list) -> int:
    """Multiply-adds of scaled_dot_product_attention (fvcore has no handle for it): QK^T and PV."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(inputs[i]) for i in range(3))
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _strip_wrapper_prefix(table: str, root_name: str) -> str:
    """Rename the tracing wrapper's rows: `model.x` → `x` and the root `model` → the class name."""
    lines = []
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 2:
            name, width = cells[1].strip(), len(cells[1])
            if name == "model":
                cells[1] = f" {root_name}".ljust(width)
            elif name.startswith("model."):
                cells[1] = f" {name[len('model.'):]}".ljust(width)
        lines.append("|".join(cells))
    return "\n".join(lines)


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


def describe(model: nn.Module, shape: Optional[ExampleShape] = None, max_depth: int = 3) -> str:
    """The module tree with parameters and per-sample multiply-adds, plus totals."""
    from fvcore.nn import flop_count_table

    shape = shape or ExampleShape()
    model = model.eval()
    batch = example_batch(model, shape)
    analysis = count_multiply_adds(model, batch)
    total = analysis.total()
    table = _strip_wrapper_prefix(flop_count_table(analysis, max_depth=max_depth + 1, show_param_shapes=False), type(model).__name__)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_sample = (
        f"per sample: {shape.text_length} text tokens, {shape.regions} regions"
        + (f", a {shape.image_height}x{shape.image_width} image" if batch.images is not None else "")
        + f", {shape.mask_fraction:.0%} of tokens and regions masked"
    )
    return "\n".join(
        [
            table,
            "",
            f"parameters: {parameters:,} ({trainable:,} trainable, {parameters - trainable:,} frozen)",
            f"multiply-adds {per_sample}: {total / 1e9:.2f} G (FLOPs = 2 x multiply-adds: {2 * total / 1e9:.2f} G)",
            "elementwise ops and softmax are not counted (fvcore's convention)",
        ]
    )
