"""Optimisers with VL-BERT's per-sample learning rate; the warm-up + linear-decay ("triangle")
and warm-up + step schedules."""

from __future__ import annotations

import bisect
from typing import Sequence

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR


def scaled_learning_rate(lr_per_sample: float, batch_size: int, accumulation_steps: int, world_size: int = 1) -> float:
    """VL-BERT's configs give the LR per sample: lr = LR x world size x batch x accumulation."""
    return lr_per_sample * world_size * batch_size * accumulation_steps


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: biases and LayerNorm parameters get no weight decay (as in BERT)."""
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:  # tied weights once
                seen.add(id(parameter))
                plain = isinstance(owner, nn.LayerNorm) or name == "bias"
                (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    module: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 1e-4
) -> AdamW:
    """AdamW over the trainable parameters (`decay_groups`)."""
    return AdamW(decay_groups(module, weight_decay), lr=lr, betas=betas, eps=eps)


def build_sgd(module: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> SGD:
    """SGD with momentum over the trainable parameters (`decay_groups`), as VL-BERT fine-tunes VCR."""
    return SGD(decay_groups(module, weight_decay), lr=lr, momentum=momentum)


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
