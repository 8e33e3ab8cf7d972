"""Every random generator a training run draws from, captured for a checkpoint and restored on resume."""

from __future__ import annotations

import random
from typing import Any

import torch


def capture_random_state() -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators (dropout, loader seeds) and Python's
    `random`. (The masking needs none: it draws from each sample's own seed.)"""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def restore_random_state(state: dict[str, Any]) -> None:
    """Put every generator back where `capture_random_state` found it."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
