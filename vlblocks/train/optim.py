"""Optimisers with VL-BERT's per-sample learning rate; the warm-up + linear-decay ("triangle")
and warm-up + step schedules."""

from __future__ import annotations

import bisect
from typing import Sequence

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlblocks.train.adamw import VLBertAdamW


def scaled_learning_rate(lr_per_sample: float, batch_size: int, accumulation_steps: int) -> float:
    """VL-BERT's configs give the LR per sample: lr = LR x batch (over all processes) x
    accumulation, which is the official LR x world size x per-GPU batch x accumulation."""
    return lr_per_sample * batch_size * accumulation_steps


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The module's trainable parameters, each once (a tied weight is one parameter)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def is_bias_or_norm(owner: nn.Module, name: str) -> bool:
    """True for a bias or any parameter of a LayerNorm (BERT's no-decay set)."""
    return isinstance(owner, nn.LayerNorm) or name == "bias"


def decay_groups(module: nn.Module, weight_decay: float, decay_biases_and_norms: bool = True) -> list[dict]:
    """Optimiser parameter groups over the trainable parameters, tied weights once.

    decay_biases_and_norms True (VL-BERT's `*/function/train.py`): one group, every parameter
    decayed by `weight_decay`. False (BERT's convention): two groups, the second holding the
    biases and LayerNorm parameters with no weight decay.
    """
    if decay_biases_and_norms:
        return [{"params": trainable_parameters(module), "weight_decay": weight_decay}]
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                (no_decay if is_bias_or_norm(owner, name) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    module: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    decay_biases_and_norms: bool = True,
    official: bool = True,
    fused: bool = False,
) -> Optimizer:
    """AdamW over the trainable parameters (`decay_groups`): VL-BERT's own (`VLBertAdamW`), or
    with `official` False `torch.optim.AdamW` (epsilon after the bias correction, decay before
    the update); `fused`: either one's single-pass kernel."""
    groups = decay_groups(module, weight_decay, decay_biases_and_norms)
    if official:
        return VLBertAdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    return AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def build_sgd(
    module: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, decay_biases_and_norms: bool = True, fused: bool = False
) -> SGD:
    """SGD with momentum over the trainable parameters (`decay_groups`), as VL-BERT fine-tunes VCR;
    `fused`: torch's single-pass kernel."""
    return SGD(decay_groups(module, weight_decay, decay_biases_and_norms), lr=lr, momentum=momentum, fused=fused or None)


def warmup_step_schedule(optimizer: Optimizer, warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1) -> LambdaLR:
    """0 → lr linearly over `warmup_steps`, then lr x gamma^k after the k-th milestone step."""
    milestones = sorted(milestones)

    def factor(step: int) -> float:
        warm = step / max(1, warmup_steps) if step < warmup_steps else 1.0
        return warm * gamma ** bisect.bisect_right(milestones, step)

    return LambdaLR(optimizer, factor)


def warmup_linear_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """0 → lr linearly over `warmup_steps`, then linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
