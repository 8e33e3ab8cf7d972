"""The speed of a VL-BERT BASE pre-training step against transformers' VisualBERT, in one run.

Two tables, each measured in this one run on this machine:

1. VL-BERT BASE over precomputed 2048-d region features (batch 8, 32 text tokens, 36 regions;
   masked LM + masked RoI classification; forward + backward + AdamW) against
   `transformers.VisualBertForPreTraining` of the same size and shapes (masked LM over the same
   masked words, plus its sentence-image head), steps alternating between the two so that noise
   hits both alike: median ms per step, the ratio, FLOPs per step (`torch.utils.flop_counter`,
   forward + backward), model FLOP utilisation against the matmul peak measured at the start
   (the faster of `torch.matmul` and, on a CPU in fp32, oneDNN's matmul), and peak memory.
   vlblocks computes as its Trainer does by default (on a CPU in fp32, the linear layers on
   oneDNN, `Trainer.onednn_linears`); transformers as a user runs it, and, where the two differ,
   also with vlblocks' oneDNN linears, so the table separates what the kernel gives from what
   the model does. Precisions whose matmul peak on this machine is under a tenth of fp32's are
   reported and skipped (a CPU without bf16 instructions emulates it).
2. A realistic length mix (captions of 5-30 word pieces, 10-100 regions): batches grouped by
   length and packed to their own longest row, against every row padded to the maximum, the two
   plans' batches alternating.

Peak memory is the CUDA allocator's peak on a GPU. On the CPU, where the allocator keeps no peak
of its own, a separate process builds the model and takes three steps (model, gradients and
optimiser state included) and reports its peak resident size and, in brackets, the peak of the
C heap in use after any operator of the last two steps (`HeapPeak`, glibc only): the memory the
tensors hold, without the freed pages the resident size still counts.

Usage::

    python bench/train_step.py [--device cpu|cuda] [--precisions fp32,bf16] [--steps 6]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import VisualBertConfig, VisualBertForPreTraining

from vlblocks.app.allocator import restart_with_tuned_allocator
from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.data.pipeline.sampling import LengthBucketSampler
from vlblocks.objectives import MaskedLanguageModeling, MaskedRegionClassification
from vlblocks.objectives.pretraining_task import scored_length
from vlblocks.train.loop import Trainer
from vlblocks.train.onednn_linear import onednn_linear_available, onednn_product
from vlblocks.train.optim import build_adamw
from vlblocks.train.precision import Precision, resolve_precision

VOCAB, CLASSES, FEATURES, MASK_ID = 30522, 1601, 2048, 103
RECIPE = """include 'models/vlbert_base_prec.gin'
include 'pretraining.gin'
PretrainingTask.objectives = [@image_text/MaskedLanguageModeling(), @MaskedRegionClassification()]
MaskedRegionClassification.precomputed_feature_size = 2048
MaskedLanguageModeling.vocab_size = 30522
MaskedLanguageModeling.mask_token_id = 103
"""
quiet = lambda *_: None  # noqa: E731


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per model and precision (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mix-samples", type=int, default=48, help="samples in the length-mix comparison")
    parser.add_argument("--compile", metavar="BACKEND", help="time both models with their forward under torch.compile (e.g. inductor, "
                        "as Trainer.compile does); FLOPs are counted eagerly, and the length mix stays eager")
    parser.add_argument("--peak-memory-of", choices=["vlblocks", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    return parser.parse_args()


def vlblocks_task() -> torch.nn.Module:
    """VL-BERT BASE pre-training (masked LM + masked RoI classification) over precomputed features."""
    with tempfile.NamedTemporaryFile("w", suffix=".gin", dir=Path(__file__).parent, delete=False) as handle:
        handle.write(RECIPE)
    recipe = Path(handle.name)
    try:
        parse_recipe(recipe)
        build_task, *_ = build_from_recipe(recipe, experiment, quiet)
        return build_from_recipe(recipe, build_task, quiet)
    finally:
        recipe.unlink()


def transformers_model() -> torch.nn.Module:
    config = VisualBertConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              visual_embedding_dim=FEATURES)
    return VisualBertForPreTraining(config)


def sample(words: int, regions: int, rng: np.random.Generator) -> EncodedSample:
    """A caption of `words` word pieces between [CLS] and [SEP], and `regions` boxes (the whole image first)."""
    text = np.concatenate([[101], rng.integers(1000, VOCAB, words), [102]])
    word_index = np.concatenate([[-1], np.arange(words), [-1]])
    corners = rng.uniform(0, 400, (regions, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(20, 200, (regions, 2))], 1).astype(np.float32)
    boxes[0] = (0, 0, 639, 479)
    scores = rng.dirichlet(np.ones(CLASSES), regions).astype(np.float32)
    scores[0] = 0
    return EncodedSample(text, word_index, boxes, scores, rng.standard_normal((regions, FEATURES)).astype(np.float32), None, (640, 480))


def prepared(samples: list[EncodedSample], first_index: int, padded_to: tuple[int, int] | None = None) -> VLBatch:
    """The samples collated (optionally padded) and masked as the recipe's objectives mask them
    (each sample from its seed, so no model is needed here)."""
    batch = collate_pretraining(samples)
    if padded_to is not None:
        batch = pad_batch(batch, *padded_to)
    batch = batch.replace(sample_seeds=torch.arange(first_index, first_index + len(samples)))
    words = MaskedLanguageModeling(probability=0.15, mask_fraction=0.8, random_fraction=0.1, vocab_size=VOCAB, mask_token_id=MASK_ID)
    regions = MaskedRegionClassification(probability=0.15, mask_fraction=0.9, precomputed_feature_size=FEATURES)
    masked = regions.mask(words.mask(batch, batch.sample_seeds), batch.sample_seeds)
    return masked.replace(scored_length=scored_length(masked, [words, regions]))


def pad_batch(batch: VLBatch, text_length: int, regions: int) -> VLBatch:
    """`batch` with every row padded to `text_length` tokens and `regions` regions."""
    def pad(tensor: torch.Tensor, size: int, value: float) -> torch.Tensor:
        shape = list(tensor.shape)
        extra = size - shape[1]
        shape[1] = extra
        return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], 1)

    return batch.replace(
        text_ids=pad(batch.text_ids, text_length, 0), segment_ids=pad(batch.segment_ids, text_length, 0),
        text_mask=pad(batch.text_mask, text_length, False), word_index=pad(batch.word_index, text_length, -1),
        boxes=pad(batch.boxes, regions, 0.0), region_mask=pad(batch.region_mask, regions, False),
        region_features=pad(batch.region_features, regions, 0.0), region_class_scores=pad(batch.region_class_scores, regions, 0.0),
        sequence_length=text_length + regions + 1,
    )


def visualbert_inputs(batch: VLBatch) -> dict[str, torch.Tensor]:
    """The same samples for VisualBERT: the same masked words (labels -100 elsewhere, regions included)."""
    rows, regions = batch.region_mask.shape
    labels = torch.where(batch.mlm_labels >= 0, batch.mlm_labels, -100)
    return dict(
        input_ids=batch.text_ids, token_type_ids=batch.segment_ids, attention_mask=batch.text_mask.long(),
        visual_embeds=batch.region_features, visual_attention_mask=batch.region_mask.long(),
        visual_token_type_ids=torch.ones(rows, regions, dtype=torch.long),
        labels=torch.cat([labels, torch.full((rows, regions), -100)], 1), sentence_image_labels=torch.ones(rows, dtype=torch.long),
    )


def stepper(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], precision, device: torch.device) -> Callable[[], float]:
    """One training step (forward, backward, AdamW) → its wall-clock seconds (device synchronised)."""
    # torch.optim.AdamW's fused kernel for both models (`Trainer.optimizer = 'torch_adamw'` with
    # `Trainer.fused_optimizer = True`), so the ratio compares the models, not two optimisers.
    optimizer = build_adamw(model, 1e-5, (0.9, 0.999), 1e-6, 1e-4, official=False, fused=True)

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with precision.autocast():
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops(loss_of: Callable[[], torch.Tensor], precision) -> int:
    with FlopCounterMode(display=False) as counter:
        with precision.autocast():
            loss = loss_of()
        loss.backward()
    return counter.get_total_flops()


def matmul_peaks(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> dict[str, float]:
    """FLOP/s of a square matmul in `dtype` by kernel: `torch.matmul`, and on a CPU in float32
    also oneDNN's (which vlblocks' training uses there). 2048 x 2048, or 512 x 512 where that is
    already slow (an emulated dtype), the best of repeated timings over about `seconds`."""
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch.matmul": torch.matmul}
    if device.type == "cpu" and dtype == torch.float32 and onednn_linear_available():
        kernels["oneDNN"] = lambda a, b: onednn_product(a, b, None)  # a @ b^T: b laid out as a linear weight
    rates = dict.fromkeys(kernels, 0.0)
    for size in (512, 2048):
        a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
        slowest = 0.0
        for name, multiply in kernels.items():
            best, spent = float("inf"), 0.0
            while spent < seconds:
                synchronize(device)
                start = time.perf_counter()
                multiply(a, b)
                synchronize(device)
                elapsed = time.perf_counter() - start
                best, spent = min(best, elapsed), spent + elapsed
            rates[name] = max(rates[name], 2 * size**3 / best)
            slowest = max(slowest, best)
        if slowest > 0.05:  # too slow to try the larger size
            break
    return rates


def training_precision(name: str, device: torch.device, compile: str | None = None) -> Precision:
    """`name` as vlblocks' Trainer computes it by default, with `Trainer.compile = compile` (on a
    CPU in fp32 and eager: the large linear layers on oneDNN)."""
    return Trainer(compile=compile).resolve_precision(device, quiet, name)


def step_batch(batch_size: int) -> VLBatch:
    """`batch_size` samples of 32 tokens ([CLS] + 30 + [SEP]) and 36 regions, masked."""
    rng = np.random.default_rng(0)
    return prepared([sample(30, 36, rng) for _ in range(batch_size)], 0)


def vlblocks_step_inputs(device: torch.device, batch: VLBatch):
    """VL-BERT BASE and its loss on `batch`."""
    torch.manual_seed(0)
    task = vlblocks_task().to(device).train()
    batch = batch.to(device)
    return task, (lambda: task(batch).loss)


def transformers_step_inputs(device: torch.device, batch: VLBatch):
    """VisualBERT of the same size and its loss on the same samples and masked words."""
    torch.manual_seed(0)
    baseline = transformers_model().to(device).train()
    inputs = {key: value.to(device) for key, value in visualbert_inputs(batch).items()}
    return baseline, (lambda: baseline(**inputs).loss)


def peak_memory_child(args: argparse.Namespace) -> None:
    """In a child process: build one model, take 3 steps, print the peak resident size (bytes)."""
    device = torch.device(args.device)
    if args.peak_memory_of == "vlblocks":
        precision = training_precision(args.precision, device, args.compile)
    else:
        precision = resolve_precision(args.precision, device, from_recipe=False, echo=quiet)
    batch = step_batch(args.batch)
    inputs = vlblocks_step_inputs if args.peak_memory_of == "vlblocks" else transformers_step_inputs
    model, loss_of = inputs(device, batch)
    if args.compile:
        model.compile(backend=args.compile)
    step = stepper(model, loss_of, precision, device)
    step()
    heap = HeapPeak() if heap_in_use() is not None else contextlib.nullcontext()
    with heap:
        for _ in range(2):
            step()
    print(json.dumps({"peak_bytes": peak_resident_bytes(), "heap_peak_bytes": getattr(heap, "peak", None)}))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None) if sys.platform == "linux" else None  # glibc 2.33 and later
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2


def heap_in_use() -> int | None:
    """Bytes the C heap holds allocated right now (glibc's mallinfo2, mmapped blocks included):
    on a CPU, every tensor's memory; None where glibc is not the C library."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """The most heap in use (`heap_in_use`) after any operator while active: on a CPU, the peak of
    the memory a step's tensors hold (weights, gradients, optimiser state, activations), as
    CUDA's `max_memory_allocated` is on a GPU, without the freed pages that the resident size
    still counts."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use() or 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return result


def peak_resident_bytes() -> int:
    """This process's peak resident size: VmHWM on Linux (ru_maxrss would include the parent's
    peak before exec), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(args: argparse.Namespace, which: str, precision: str) -> str:
    """The CPU peaks of a step in a separate process, in MiB: resident size (heap peak)."""
    command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch), "--peak-memory-of", which, "--precision", precision]
    command += ["--compile", args.compile] if args.compile else []
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    peaks = json.loads(output.strip().splitlines()[-1])
    heap = f" (heap {peaks['heap_peak_bytes'] / 2**20:.0f})" if peaks["heap_peak_bytes"] is not None else ""
    return f"{peaks['peak_bytes'] / 2**20:.0f}{heap}"


def compare_with_transformers(args: argparse.Namespace, device: torch.device, peaks: dict[str, float], names: list[str]) -> None:
    batch = step_batch(args.batch)
    task, task_loss = vlblocks_step_inputs(device, batch)
    baseline, baseline_loss = transformers_step_inputs(device, batch)
    compiled = ""
    if args.compile:
        task.compile(backend=args.compile)
        baseline.compile(backend=args.compile)
        compiled = f", both compiled with torch.compile backend {args.compile!r}"
    print(f"\n## VL-BERT BASE vs transformers VisualBertForPreTraining (batch {args.batch}, 32 tokens + 36 regions, {device}{compiled})\n")
    print("| precision | vlblocks ms/step | transformers ms/step | speed-up | transformers with oneDNN linears ms/step | speed-up over it "
          "| vlblocks GFLOP/step | transformers GFLOP/step | vlblocks MFU | transformers MFU | vlblocks peak MiB | transformers peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        peak = peaks[name]
        if peak < 0.1 * peaks["fp32"]:
            print(f"| {name} | skipped: this machine's {name} matmul peak is {peak / 1e9:.1f} GFLOP/s (fp32 {peaks['fp32'] / 1e9:.0f}) |" + " |" * 10)
            continue
        plain, training = resolve_precision(name, device, from_recipe=False, echo=quiet), training_precision(name, device, args.compile)
        steps = {"ours": stepper(task, task_loss, training, device), "theirs": stepper(baseline, baseline_loss, plain, device)}
        if training.routes_linears_to_onednn:  # the same kernel for transformers, to tell the kernel's share from the model's
            steps["theirs, oneDNN"] = stepper(baseline, baseline_loss, training, device)
        warm_up: dict[str, list[float]] = {which: [] for which in steps}
        for _ in range(2):
            for which, step in steps.items():
                warm_up[which].append(step())
        if args.compile:
            print(f"first step (compiling): vlblocks {warm_up['ours'][0]:.1f} s, transformers {warm_up['theirs'][0]:.1f} s", flush=True)
        times: dict[str, list[float]] = {which: [] for which in steps}
        for _ in range(args.steps):
            for which, step in steps.items():
                times[which].append(step())
        seconds = {which: statistics.median(values) for which, values in times.items()}
        ours_s, theirs_s = seconds["ours"], seconds["theirs"]
        # The FLOP counter sees aten's matmuls, not oneDNN's kernel: count the same arithmetic on
        # the plain path, and the eager graph of a compiled model.
        with torch.compiler.set_stance("force_eager"):
            ours_flops, theirs_flops = flops(task_loss, plain), flops(baseline_loss, plain)
        task.zero_grad(set_to_none=True), baseline.zero_grad(set_to_none=True)
        if device.type == "cuda":
            memory = {}
            for which in ("ours", "theirs"):
                torch.cuda.reset_peak_memory_stats(device)
                steps[which]()
                memory[which] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
        else:
            memory = {"ours": peak_memory(args, "vlblocks", name), "theirs": peak_memory(args, "transformers", name)}
        same_kernel = (f"{seconds['theirs, oneDNN'] * 1e3:.0f} | {seconds['theirs, oneDNN'] / ours_s:.2f}x" if "theirs, oneDNN" in seconds
                       else "(the same kernels) | ")
        print(f"| {name} | {ours_s * 1e3:.0f} | {theirs_s * 1e3:.0f} | {theirs_s / ours_s:.2f}x | {same_kernel} | {ours_flops / 1e9:.0f} | {theirs_flops / 1e9:.0f} "
              f"| {ours_flops / ours_s / peak:.0%} | {theirs_flops / theirs_s / peak:.0%} | {memory['ours']} | {memory['theirs']} |",
              flush=True)
        tokens = args.batch * (32 + 36)
        print(f"|   | {tokens / ours_s:.0f} tokens/s | {tokens / theirs_s:.0f} tokens/s |" + " |" * 9, flush=True)


def length_mix(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    task = vlblocks_task().to(device).train()
    rng = random.Random(0)
    generator = np.random.default_rng(1)
    samples = [sample(rng.randint(5, 30), rng.randint(10, 100), generator) for _ in range(args.mix_samples)]
    lengths = [len(s.text_ids) + len(s.boxes) for s in samples]
    bucketed = list(LengthBucketSampler(lengths, args.batch, seed=0))
    in_order = [list(range(start, start + args.batch)) for start in range(0, len(samples) - args.batch + 1, args.batch)]
    longest = (max(len(s.text_ids) for s in samples), max(len(s.boxes) for s in samples))
    precision = training_precision("fp32", device)
    plans = {
        "padded to the longest caption and region list": [prepared([samples[i] for i in batch], batch[0], longest) for batch in in_order],
        "length-bucketed, packed per batch": [prepared([samples[i] for i in batch], batch[0]) for batch in bucketed],
    }
    holders = {name: {"batch": batches[0].to(device)} for name, batches in plans.items()}
    steps = {name: stepper(task, lambda holder=holder: task(holder["batch"]).loss, precision, device) for name, holder in holders.items()}
    for step in steps.values():
        step()
    seconds = dict.fromkeys(plans, 0.0)
    for position in range(max(len(batches) for batches in plans.values())):  # the plans alternate, batch by batch
        for name, batches in plans.items():
            if position < len(batches):
                holders[name]["batch"] = batches[position].to(device)
                seconds[name] += steps[name]()
    count = len(in_order) * args.batch
    print(f"\n## A realistic length mix: {count} samples, captions of 5-30 word pieces, 10-100 regions (VL-BERT BASE, fp32, {device})\n")
    print("| batches | samples/s | seconds |")
    print("|---|---|---|")
    for name, spent in seconds.items():
        print(f"| {name} | {count / spent:.2f} | {spent:.1f} |")
    padded, packed = seconds.values()
    print(f"\nbucketing and packing: {padded / packed:.2f}x the samples per second of padding to the maximum")


def main() -> None:
    restart_with_tuned_allocator([__file__, *sys.argv[1:]])  # as `vlblocks train` runs; both models alike
    args = parse_args()
    if args.peak_memory_of:
        peak_memory_child(args)
        return
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    names = args.precisions.split(",")
    kernel_peaks = {name: matmul_peaks(device, dtypes[name]) for name in dict.fromkeys(["fp32", *names])}
    peaks = {name: max(rates.values()) for name, rates in kernel_peaks.items()}
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print("matmul peak (the faster kernel's): " + ", ".join(
        f"{name} {peaks[name] / 1e9:.1f} GFLOP/s ({', '.join(f'{kernel} {rate / 1e9:.1f}' for kernel, rate in rates.items())})"
        for name, rates in kernel_peaks.items()))
    compare_with_transformers(args, device, peaks, names)
    if args.mix_samples > 0:
        length_mix(args, device)


if __name__ == "__main__":
    main()
