"""AdamW with VL-BERT's per-sample learning rate and the warm-up + linear-decay ("triangle") schedule."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

def scaled_learning_rate(lr_per_sample: float, batch_size: int, accumulation_steps: int, world_size: int = 1) -> float:
    """VL-BERT's configs give the LR per sample: lr = LR x world size x batch x accumulation."""
    return lr_per_sample * world_size * batch_size * accumulation_steps


def build_adamw(
    module: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 1e-4
) -> AdamW:
    """AdamW over trainable parameters; biases and LayerNorm parameters get no weight decay (as in BERT)."""
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:  # tied weights once
                seen.add(id(parameter))
                plain = isinstance(owner, nn.LayerNorm) or name == "bias"
                (no_decay if plain else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_linear_schedule(optimizer: AdamW, warmup_steps: int, total_steps: int) -> LambdaLR:
    """0 → lr linearly over `warmup_steps`, then linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
