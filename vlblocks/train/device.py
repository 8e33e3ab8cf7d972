"""Where a run computes: `--device auto|cpu|cuda|cuda:N|mps`, and how batches get there."""

from __future__ import annotations

import os
from typing import Optional

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str = "auto") -> torch.device:
    """The device `spec` names: 'auto' is the current CUDA device when CUDA is available, else
    the CPU; 'cuda', 'cuda:N' and 'mps' must exist on this machine.

    Raises:
        ValueError: a device this machine does not have, or a name that is not one.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: expected {DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {spec!r}: this machine has no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {spec!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {spec!r}: expected {DEVICES}")
    return device


def pins_memory(device: torch.device) -> bool:
    """Whether batches for `device` are collated into pinned memory (and copied without blocking)."""
    return device.type == "cuda"


def default_workers(device: torch.device, processes_on_machine: int = 1, cores: Optional[int] = None) -> int:
    """DataLoader workers per training process when the recipe does not say: none on the CPU (the
    training's own threads use every core, and a worker would take cores from them); on an
    accelerator, one per core left to this process after its own (at most 8)."""
    if device.type == "cpu":
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, processes_on_machine) - 1))
