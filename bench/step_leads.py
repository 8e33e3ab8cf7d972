"""Leads for a faster VL-BERT BASE step, each timed against what the library does today, in one run.

1. Attention at BASE size (batch 8, 71 positions, 768 wide, 12 heads; forward + backward of the
   query/key/value projections and `scaled_dot_product_attention`): three projections (today)
   against one fused [768 -> 2304] projection, and a dense all-True key mask (today) against no
   mask, as a batch that needs none could pass; without and with attention dropout (0.1).
2. The whole `bench/train_step.py` step (fp32, fused AdamW) with the word table's gradient in one
   buffer (`WordEmbedding.one_gradient`, today: the lookup's rows added in place into the tied
   decoder's gradient) against autograd's way (a dense lookup gradient, zero-filled, and an
   out-of-place sum with the decoder's).

3. The last of the 12 layers (BASE, batch 8 of 32 words + 36 regions, dropout 0.1; forward +
   backward) at every position (today) against at the scored positions alone: 11 query rows a
   sample (about 15% of the words and regions masked, and [CLS]), keys and values still from
   every position, through `MultiHeadAttention`'s context input. Pre-training reads the last
   layer nowhere else, so the difference bounds what that lead can take off a step.

Variants alternate within each repetition so that noise on the machine hits them alike; each
line is a median.

Usage::

    python bench/step_leads.py [--device cpu|cuda] [--repeats 15] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
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
from vlblocks.blocks.encoder import TransformerLayer  # noqa: E402
from vlblocks.train.precision import resolve_precision  # noqa: E402

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


def attention_leads(device: torch.device, repeats: int) -> None:
    variants = {(fused, masked, dropout): attention_step(device, fused, masked, dropout)
                for fused in (False, True) for masked in (True, False) for dropout in (0.0, 0.1)}
    print("| projections | key mask | attention dropout | ms (forward + backward) |\n|---|---|---|---|")
    for (fused, masked, dropout), median in alternated_medians(variants, device, repeats).items():
        print(f"| {'one fused' if fused else 'three'} | {'dense, all True' if masked else 'none'} | {dropout} | {median:.1f} |")


def word_gradient_lead(device: torch.device, steps: int) -> None:
    precision = resolve_precision("fp32", device, from_recipe=False, echo=train_step.quiet)
    task, loss_of = train_step.vlblocks_step_inputs(device, train_step.step_batch(BATCH))
    step = train_step.stepper(task, loss_of, precision, device)

    def use(one_buffer: bool) -> None:  # an instance attribute shadows the model's method
        if one_buffer:
            vars(task.model).pop("one_word_gradient", None)
        else:
            task.model.one_word_gradient = contextlib.nullcontext

    times: dict[bool, list[float]] = {True: [], False: []}
    for one_buffer in times:
        use(one_buffer)
        step(), step()
    for _ in range(steps):
        for one_buffer in times:
            use(one_buffer)
            times[one_buffer].append(step() * 1000)
    print("\n| word-table gradient | ms per step (fp32) |\n|---|---|")
    for one_buffer, values in times.items():
        print(f"| {'one buffer, the lookup rows added in place (today)' if one_buffer else 'autograd: dense lookup gradient + out-of-place sum'} | {statistics.median(values):.0f} |")


def last_layer_step(device: torch.device, scored_rows: Optional[int]) -> Callable[[], None]:
    """Forward + backward of one BASE `TransformerLayer` in training mode, its queries at every
    position (`scored_rows` None) or at the first `scored_rows` positions of each sample."""
    generator = torch.Generator().manual_seed(0)
    layer = TransformerLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12).to(device).train()
    positions = 32 + 36
    hidden = torch.randn(BATCH, positions, HIDDEN, generator=generator).to(device)
    key_mask = torch.ones(BATCH, positions, dtype=torch.bool, device=device)

    def step() -> None:
        states = hidden.clone().requires_grad_()
        if scored_rows is None:
            output, _ = layer(states, key_mask)
        else:
            queries = states[:, :scored_rows]
            attended, _ = layer.attention(queries, key_mask, context=states)
            output = layer.output(layer.intermediate(attended), attended)
        output.sum().backward()

    return step


def last_layer_lead(device: torch.device, repeats: int) -> None:
    variants = {"every position (today)": last_layer_step(device, None), "11 scored rows a sample": last_layer_step(device, 11)}
    print("\n| last layer's queries | ms (one BASE layer, forward + backward) |\n|---|---|")
    for name, median in alternated_medians(variants, device, repeats).items():
        print(f"| {name} | {median:.1f} |")


def main() -> None:
    restart_with_tuned_allocator([__file__, *sys.argv[1:]])  # as `vlblocks train` runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15, help="alternating repetitions of the attention variants")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per word-gradient variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}\n")
    attention_leads(device, args.repeats)
    last_layer_lead(device, args.repeats)
    word_gradient_lead(device, args.steps)


if __name__ == "__main__":
    main()
