"""The AdamW that VL-BERT trains with (its `common/nlp/bert/optimization.py`, from early
pytorch-transformers), which differs from `torch.optim.AdamW` in two places:

- epsilon is added to sqrt(v) before the bias correction, which is folded into the step size:
  p -= lr x sqrt(1 - b2^t) / (1 - b1^t) x m / (sqrt(v) + eps), so early steps see an effective
  epsilon of eps / sqrt(1 - b2^t) (about 3.2e-5 at step 1 for eps 1e-6);
- the weight decay comes after the Adam update and scales the updated weights:
  p -= lr x wd x p.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch.optim import Optimizer


class VLBertAdamW(Optimizer):
    """AdamW as VL-BERT's official code steps it (see the module docstring).

    Args:
        params: parameters or parameter groups (each group may set its own `weight_decay`).
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (VL-BERT: eps 1e-6, betas (0.9, 0.999)).
        correct_bias: fold Adam's bias correction into the step size (True in every VL-BERT config).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"VLBertAdamW: invalid lr {lr}, betas {betas} or eps {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.grad.is_sparse:
                    raise RuntimeError("VLBertAdamW does not support sparse gradients")
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())  # a host tensor: no device wait
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(parameter.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(parameter.grad, parameter.grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                parameter.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    parameter.mul_(1.0 - group["lr"] * group["weight_decay"])
        return loss
