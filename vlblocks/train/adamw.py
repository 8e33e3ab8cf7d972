"""The AdamW that VL-BERT trains with (its `common/nlp/bert/optimization.py`, from early
pytorch-transformers), which differs from `torch.optim.AdamW` in two places:

- epsilon is added to sqrt(v) before the bias correction, which is folded into the step size:
  p -= lr x sqrt(1 - b2^t) / (1 - b1^t) x m / (sqrt(v) + eps), so early steps see an effective
  epsilon of eps / sqrt(1 - b2^t) (about 3.2e-5 at step 1 for eps 1e-6);
- the weight decay comes after the Adam update and scales the updated weights:
  p -= lr x wd x p.

`fused=True` takes the whole update in one pass over each tensor, with PyTorch's fused AdamW
kernel (which decays first, p x (1 - lr' wd'), then subtracts lr' / (1 - b1^t) x m / (sqrt(v) /
sqrt(1 - b2^t) + eps')). VL-BERT's update is that one with eps' = eps / sqrt(1 - b2^t),
lr' = lr (1 - lr wd) and wd' = wd / (1 - lr wd): (p - u)(1 - lr wd) = p (1 - lr wd) - u (1 - lr wd).
The result equals the loop's up to float32 rounding; on a 2-core CPU an update of BERT-base's
110M parameters took 266 ms in the loop and 67 ms fused (`bench/optimizer_step.py`).
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
        fused: one fused kernel per step count, device and dtype instead of a loop of tensor
            operations per parameter (see the module docstring); needs `correct_bias`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        fused: bool = False,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"VLBertAdamW: invalid lr {lr}, betas {betas} or eps {eps}")
        if fused and not correct_bias:
            raise ValueError("VLBertAdamW: fused=True needs correct_bias=True (the fused kernel always corrects the bias)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, fused=fused))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["fused"]:
                self._fused_step(group)
                continue
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self._state(parameter)
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the saved state and hyperparameters, but keeps this optimiser's `fused` choice:
        how the update is computed is not part of the state (the two ways interchange)."""
        fused = [group["fused"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, choice in zip(self.param_groups, fused):
            group["fused"] = choice

    def _state(self, parameter: torch.Tensor) -> dict:
        """The parameter's state, created at its first step."""
        if parameter.grad.is_sparse:
            raise RuntimeError("VLBertAdamW does not support sparse gradients")
        state = self.state[parameter]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        return state

    def _fused_step(self, group: dict) -> None:
        """One `torch._fused_adamw_` call per (step count, device, dtype) of the group's parameters."""
        beta1, beta2 = group["betas"]
        parameters = [parameter for parameter in group["params"] if parameter.grad is not None]
        if not parameters:
            return
        counters = [self._state(parameter)["step"] for parameter in parameters]
        torch._foreach_add_(counters, 1.0)
        parts: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
        for parameter, step in zip(parameters, torch.stack(counters).tolist()):  # host counters: one read, no device wait
            parts.setdefault((int(step), parameter.device, parameter.dtype), []).append(parameter)
        decay = group["lr"] * group["weight_decay"]
        if decay >= 1.0:
            raise ValueError(f"VLBertAdamW: lr x weight_decay is {decay}, which would zero or flip the weights")
        for (step, device, _), members in parts.items():
            states = [self.state[parameter] for parameter in members]
            # The kernel reads the step from a tensor on the parameters' device; the host counters stay the state.
            steps = [state["step"] for state in states] if device.type == "cpu" else [torch.full((), float(step), device=device)] * len(states)
            torch._fused_adamw_(
                members, [parameter.grad for parameter in members], [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states], [], steps, lr=group["lr"] * (1.0 - decay), beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"] / (1.0 - decay), eps=group["eps"] / math.sqrt(1.0 - beta2**step),
                amsgrad=False, maximize=False,
            )
