"""Where a BASE pre-training step's time goes: every operator of `bench/train_step.py`'s step, timed.

A `TorchDispatchMode` times each operator the step runs (forward, backward and the optimiser's
update; on a GPU each is synchronised, which slows the step) and the table sums them by operator
over `--steps` steps: milliseconds per step, calls per step, and for the matmuls their GFLOP/s
inside the step, to read against the matmul peak that `bench/train_step.py` measures. The model
computes as the Trainer does by default (on a CPU in fp32, the linear layers on oneDNN); add
`--blas-linears` for `torch.matmul`'s kernel, `--model transformers` for VisualBERT.

Usage::

    python bench/step_ops.py [--model vlblocks|transformers] [--blas-linears] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402  (the step and its inputs, shared with the main benchmark)

from vlblocks.app.allocator import restart_with_tuned_allocator  # noqa: E402
from vlblocks.train.precision import resolve_precision  # noqa: E402

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_linear_pointwise"}


def matmul_flops(name: str, args: tuple) -> int:
    """FLOPs of one matmul operator call, by `torch.utils.flop_counter`'s formulas (oneDNN's linear
    counted as the mm of x [M, K] by its weight [N, K] transposed)."""
    if name == "_linear_pointwise":
        return flop_counter.mm_flop(args[0].shape, args[1].t().shape)
    shapes = [arg.shape for arg in args if isinstance(arg, torch.Tensor)]
    return {"mm": flop_counter.mm_flop, "addmm": flop_counter.addmm_flop, "bmm": flop_counter.bmm_flop, "baddbmm": flop_counter.baddbmm_flop}[name](*shapes)


class OperatorTimes(TorchDispatchMode):
    """Seconds, calls and (for matmuls) FLOPs per operator while active."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.flops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        train_step.synchronize(self.device)
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        train_step.synchronize(self.device)
        name = func.overloadpacket.__name__
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1
        if name in MATMULS:
            self.flops[name] += matmul_flops(name, args)
        return result


def main() -> None:
    restart_with_tuned_allocator([__file__, *sys.argv[1:]])  # as `vlblocks train` runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("vlblocks", "transformers"), default="vlblocks")
    parser.add_argument("--blas-linears", action="store_true", help="linear layers on torch.matmul's kernel, not oneDNN")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="as --precision of vlblocks train")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    inputs = train_step.vlblocks_step_inputs if args.model == "vlblocks" else train_step.transformers_step_inputs
    model, loss_of = inputs(device, train_step.step_batch(8))
    precision = resolve_precision(args.precision, device, from_recipe=False, echo=train_step.quiet, onednn_linears=not args.blas_linears)
    step = train_step.stepper(model, loss_of, precision, device)
    step(), step()
    plain = sorted(step() * 1000 for _ in range(args.steps))
    times = OperatorTimes(device)
    start = time.perf_counter()
    with times:
        for _ in range(args.steps):
            step()
    timed = (time.perf_counter() - start) / args.steps * 1000
    linears = "oneDNN" if precision.routes_linears_to_onednn else "torch.matmul's kernel"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; {args.model}, {args.precision}, linear layers on {linears}")
    print(f"a step: {plain[len(plain) // 2]:.0f} ms untimed (median of {args.steps}), {timed:.0f} ms with every operator timed, "
          f"{sum(times.seconds.values()) / args.steps * 1000:.0f} ms of it inside operators\n")
    print("| operator | ms per step | calls per step | GFLOP/s |\n|---|---|---|---|")
    for name, seconds in times.seconds.most_common(20):
        rate = f"{times.flops[name] / seconds / 1e9:.0f}" if name in times.flops else ""
        print(f"| {name} | {seconds / args.steps * 1000:.1f} | {times.calls[name] // args.steps} | {rate} |")
    matmul_seconds = sum(times.seconds[name] for name in times.flops)
    print(f"\nmatmuls: {matmul_seconds / args.steps * 1000:.0f} ms per step at {sum(times.flops.values()) / matmul_seconds / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
