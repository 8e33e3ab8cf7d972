"""A task's metrics averaged over a logging interval or a validation pass, on the device."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class WeightedMean(Metric):
    """Σ value x weight / Σ weight over every update, 0 when the weights sum to 0 (e.g. a masked
    accuracy weighted by the number of masked tokens, so it equals correct / masked overall).

    Update: value (0-d tensor or float), weight (float or 0-d tensor). Compute: 0-d tensor.
    """

    full_state_update = False

    def __init__(self, device: Optional[torch.device] = None) -> None:
        super().__init__()
        dtype = _accumulation_dtype(device or torch.device("cpu"))
        self.add_state("total", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum", persistent=True)
        self.add_state("weight", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum", persistent=True)

    def update(self, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, device=self.total.device).to(self.total.dtype)
        weight = torch.as_tensor(weight, device=self.total.device).to(self.total.dtype)
        self.total += value * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return torch.where(self.weight > 0, self.total / self.weight.clamp(min=torch.finfo(self.weight.dtype).tiny), 0.0)


class Total(Metric):
    """Σ value over every update (a count). Update: value. Compute: 0-d tensor."""

    full_state_update = False

    def __init__(self, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=_accumulation_dtype(device or torch.device("cpu"))), dist_reduce_fx="sum", persistent=True)

    def update(self, value: Tensor | float) -> None:
        self.total += torch.as_tensor(value, device=self.total.device).to(self.total.dtype)

    def compute(self) -> Tensor:
        return self.total


class TaskMetrics:
    """The metrics a task returns for each batch ('<name>/<metric>' → value), accumulated on
    `device`: '<name>/count' keys are summed (`Total`), every other key is averaged weighted by
    its '<name>/count' (by 1 where there is none; `WeightedMean`). Nothing waits for the device
    until `compute`, which (under `torch.distributed`) also sums the states of every process.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.metrics: dict[str, Metric] = {}

    def _metric(self, key: str) -> Metric:
        if key not in self.metrics:
            kind = Total if key.endswith("/count") else WeightedMean
            self.metrics[key] = kind(self.device).to(self.device)
        return self.metrics[key]

    def update(self, values: dict[str, Tensor | float]) -> None:
        for key, value in values.items():
            if key.endswith("/count"):
                self._metric(key).update(value)
            else:
                self._metric(key).update(value, values.get(f"{key.rsplit('/', 1)[0]}/count", 1.0))

    def compute(self) -> dict[str, float]:
        """Every metric as a float (the one wait for the device)."""
        if not self.metrics:
            return {}
        values = torch.stack([metric.compute().to(torch.float64 if self.device.type != "mps" else torch.float32) for metric in self.metrics.values()])
        return dict(zip(self.metrics, values.tolist()))

    def state_dict(self) -> dict[str, Any]:
        """The accumulated states, for a checkpoint (a resumed run continues the interval)."""
        return {key: {name: value.cpu() for name, value in metric.state_dict().items()} for key, metric in self.metrics.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metrics = {}
        for key, values in state.items():
            self._metric(key).load_state_dict(values)
