"""The optimiser's share of a step: one AdamW update over BERT-base's parameter shapes (110M
parameters in 200 tensors), per implementation, median of `--steps` timed updates after one
warm-up, in one run.

Usage::

    python bench/optimizer_step.py [--device cpu|cuda] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from vlblocks.train.adamw import VLBertAdamW

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 768, 3072, 12, 30522


def bert_base_shapes() -> list[tuple[int, ...]]:
    """Embeddings, 12 layers (Q, K, V, output, two feed-forward matrices, their biases and LayerNorms), pooler."""
    layer = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] + [(HIDDEN,)] * 9 + [(INTERMEDIATE,)]
    return [(VOCAB, HIDDEN), (512, HIDDEN), (2, HIDDEN), (HIDDEN,), (HIDDEN,)] + layer * LAYERS + [(HIDDEN, HIDDEN), (HIDDEN,)]


def timed(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], device: torch.device, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device)) for shape in bert_base_shapes()]
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(device) * 1e-3
    optimizer = make(parameters)
    optimizer.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = dict(lr=1e-4, eps=1e-6, weight_decay=1e-4)
    optimizers = {
        "VLBertAdamW (the official update, a loop over tensors)": lambda ps: VLBertAdamW(ps, **settings),
        "VLBertAdamW(fused=True)": lambda ps: VLBertAdamW(ps, **settings, fused=True),
        "torch.optim.AdamW (default: multi-tensor)": lambda ps: torch.optim.AdamW(ps, **settings),
        "torch.optim.AdamW(foreach=False)": lambda ps: torch.optim.AdamW(ps, **settings, foreach=False),
        "torch.optim.AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, **settings, fused=True),
    }
    count = sum(torch.Size(shape).numel() for shape in bert_base_shapes())
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; {count / 1e6:.1f}M parameters in {len(bert_base_shapes())} tensors\n")
    print("| optimizer | ms per update |")
    print("|---|---|")
    for name, make in optimizers.items():
        print(f"| {name} | {timed(make, device, args.steps) * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
