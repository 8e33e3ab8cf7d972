"""Leads for a faster VL-BERT BASE step, each timed against what the library does today, in one run.

1. Attention at BASE size (batch 8, 71 positions, 768 wide, 12 heads; forward + backward of the
   query/key/value projections and `scaled_dot_product_attention`): three projections (today)
   against one fused [768 -> 2304] projection, and a dense all-True key mask (today) against no
   mask, as a batch that needs none could pass; without and with attention dropout (0.1).
2. The whole `bench/train_step.py` step (fp32, fused AdamW) with the word table's gradient in one
   buffer (`WordEmbedding.one_gradient`, today: the lookup's rows added in place into the tied
   decoder's gradient) against autograd's way (a dense lookup gradient, zero-filled, and an
   out-of-place sum with the decoder's).
3. The whole step with the last layer at the scored states only (`PretrainingTask.scored_states_only`,
   today: the masked words' and regions' rows of each sample) against at every position.
4. On a CPU, one float32 linear layer's forward + backward at sizes from the tests' to BASE's, on
   the BLAS library that `torch.matmul` calls and on oneDNN; then the whole step with the large
   linear layers on oneDNN (`Trainer.onednn_linears`, today) against all on the BLAS.

The whole steps compute as the Trainer does by default (on a CPU, fp32 linears on oneDNN).

Variants alternate within each repetition so that noise on the machine hits them alike; each
line is a median.

Usage::

    python bench/step_leads.py [--device cpu|cuda] [--repeats 15] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Hashable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402  (the step and its inputs, shared with the main benchmark)

from vlblocks.app.allocator import restart_with_tuned_allocator  # noqa: E402
from vlblocks.train.onednn_linear import MIN_MULTIPLY_ADDS, OneDnnLinear  # noqa: E402
from vlblocks.train.precision import Precision, resolve_precision  # noqa: E402

HIDDEN, HEADS, BATCH, POSITIONS = 768, 12, 8, 71


def attention_step(device: torch.device, fused: bool, masked: bool, dropout: float) -> Callable[[], None]:
    """Forward + backward of one BASE self-attention (projections and SDPA) in a variant."""
    generator = torch.Generator().manual_seed(0)
    projections = [torch.nn.Linear(HIDDEN, HIDDEN).to(device) for _ in range(3)]
    hidden = torch.randn(BATCH, POSITIONS, HIDDEN, generator=generator).to(device)
    key_mask = torch.ones(BATCH, 1, 1, POSITIONS, dtype=torch.bool, device=device) if masked else None

    def step() -> None:
        states = hidden.clone().requires_grad_()
        if fused:
            weight = torch.cat([projection.weight for projection in projections])
            bias = torch.cat([projection.bias for projection in projections])
            q, k, v = rearrange(F.linear(states, weight, bias), "b t (n h d) -> n b h t d", n=3, h=HEADS)
        else:
            q, k, v = (rearrange(projection(states), "b t (h d) -> b h t d", h=HEADS) for projection in projections)
        F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout).sum().backward()

    return step


def timed(step: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Milliseconds per call of `step`, over `repeat` calls (device synchronised)."""
    train_step.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    train_step.synchronize(device)
    return (time.perf_counter() - start) / repeat * 1000


def alternated_medians(variants: dict[Hashable, Callable[[], None]], device: torch.device, repeats: int) -> dict[Hashable, float]:
    """Median milliseconds per call of each variant: one warm-up call each, then `repeats` rounds
    that time every variant in turn (5 calls each), so that noise hits them alike."""
    times: dict[Hashable, list[float]] = {key: [] for key in variants}
    for step in variants.values():
        step()
    for _ in range(repeats):
        for key, step in variants.items():
            times[key].append(timed(step, device, repeat=5))
    return {key: statistics.median(values) for key, values in times.items()}


def linear_step(rows: int, inputs: int, outputs: int, onednn: bool) -> Callable[[], None]:
    """Forward + backward of one float32 CPU linear layer, on oneDNN (`OneDnnLinear`) or `F.linear`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inputs, generator=generator).requires_grad_()
    layer = torch.nn.Linear(inputs, outputs)
    grad = torch.randn(rows, outputs, generator=generator)
    linear = OneDnnLinear.apply if onednn else F.linear

    def step() -> None:
        linear(x, layer.weight, layer.bias).backward(grad)

    return step


def linear_sizes(repeats: int) -> None:
    """Where oneDNN's float32 linear pays on this CPU (`MIN_MULTIPLY_ADDS`): one layer at
    sizes from the tests' up to BASE's, BLAS and oneDNN alternating."""
    sizes = [(552, 64, 64), (552, 64, 256), (552, 128, 512), (552, 256, 1024), (552, 768, 768), (552, 768, 3072), (552, 3072, 768), (2048, 768, 3072)]
    variants = {(size, onednn): linear_step(*size, onednn) for size in sizes for onednn in (False, True)}
    medians = alternated_medians(variants, torch.device("cpu"), repeats)
    print("\n| rows x inputs x outputs | multiply-adds | BLAS ms | oneDNN ms | oneDNN speed-up |\n|---|---|---|---|---|")
    for size in sizes:
        blas, onednn = medians[(size, False)], medians[(size, True)]
        rows, inputs, outputs = size
        print(f"| {rows} x {inputs} x {outputs} | 2^{math.log2(rows * inputs * outputs):.1f} | {blas:.2f} | {onednn:.2f} | {blas / onednn:.2f}x |")
    print(f"(products of at least 2^{math.log2(MIN_MULTIPLY_ADDS):.0f} multiply-adds go to oneDNN in training)")


def attention_leads(device: torch.device, repeats: int) -> None:
    variants = {(fused, masked, dropout): attention_step(device, fused, masked, dropout)
                for fused in (False, True) for masked in (True, False) for dropout in (0.0, 0.1)}
    print("| projections | key mask | attention dropout | ms (forward + backward) |\n|---|---|---|---|")
    for (fused, masked, dropout), median in alternated_medians(variants, device, repeats).items():
        print(f"| {'one fused' if fused else 'three'} | {'dense, all True' if masked else 'none'} | {dropout} | {median:.1f} |")


def whole_step_lead(device: torch.device, steps: int, title: str, variants: dict[str, Callable[[torch.nn.Module], Optional[Precision]]]) -> None:
    """Median ms of the whole `bench/train_step.py` step (fp32) of one task under each variant (a
    function that sets the task up and may return the precision to step in; None: the Trainer's
    default), the variants alternating step by step."""
    task, loss_of = train_step.vlblocks_step_inputs(device, train_step.step_batch(BATCH))
    default = train_step.training_precision("fp32", device)
    precisions = {name: use(task) or default for name, use in variants.items()}
    steppers = {precision: train_step.stepper(task, loss_of, precision, device) for precision in set(precisions.values())}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, use in variants.items():
        use(task)
        steppers[precisions[name]](), steppers[precisions[name]]()
    for _ in range(steps):
        for name, use in variants.items():
            use(task)
            times[name].append(steppers[precisions[name]]() * 1000)
    print(f"\n| {title} | ms per step (fp32) |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.0f} |")


def linears_on(onednn: bool) -> Callable[[torch.nn.Module], Precision]:
    """A variant stepping in fp32 with the large linear layers on oneDNN, or all on the BLAS."""

    def use(task: torch.nn.Module) -> Precision:
        return resolve_precision("fp32", next(task.parameters()).device, from_recipe=False, echo=train_step.quiet, onednn_linears=onednn)

    return use


def one_word_buffer(one_buffer: bool) -> Callable[[torch.nn.Module], None]:
    def use(task: torch.nn.Module) -> None:  # an instance attribute shadows the model's method
        if one_buffer:
            vars(task.model).pop("one_word_gradient", None)
        else:
            task.model.one_word_gradient = contextlib.nullcontext

    return use


def scored_states_only(only: bool) -> Callable[[torch.nn.Module], None]:
    def use(task: torch.nn.Module) -> None:
        task.scored_states_only = only

    return use


def main() -> None:
    restart_with_tuned_allocator([__file__, *sys.argv[1:]])  # as `vlblocks train` runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15, help="alternating repetitions of the attention variants")
    parser.add_argument("--steps", type=int, default=8, help="timed whole steps per variant of the last-layer and word-gradient leads")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}\n")
    attention_leads(device, args.repeats)
    if train_step.training_precision("fp32", device).routes_linears_to_onednn:
        linear_sizes(args.repeats)
        whole_step_lead(device, args.steps, "linear layers", {
            "on oneDNN (today, on a CPU)": linears_on(True),
            "on the BLAS library (torch.matmul's kernel)": linears_on(False),
        })
    whole_step_lead(device, args.steps, "last layer", {
        "the scored states only (today)": scored_states_only(True),
        "every position": scored_states_only(False),
    })
    whole_step_lead(device, args.steps, "word-table gradient", {
        "one buffer, the lookup rows added in place (today)": one_word_buffer(True),
        "autograd: dense lookup gradient + out-of-place sum": one_word_buffer(False),
    })


if __name__ == "__main__":
    main()
