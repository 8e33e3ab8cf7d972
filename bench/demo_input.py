"""Where the demo pre-training step's time goes between reading data and training.

Builds `recipes/demo/vlbert_demo.gin` on the embedded demo dataset (generated once, cached), then
measures in one process:

  (a) reading one training sample: the Conceptual Captions reader, WordPiece, the image
      pipeline (`PretrainingDataset.item_in_epoch`), over `--samples` samples, `--repeats` times;
  (b) collating a batch of the recipe's 64 samples;
  (c) a `--steps`-step training run of the recipe, with the time spent taking batches (reading,
      collating, the text-only stream) counted apart from the rest of the step.

Usage::

    python bench/demo_input.py [--samples 200] [--repeats 7] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vlblocks.app.run import build_run
from vlblocks.train import batches

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "vlbert_demo.gin"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="samples read per repetition")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60, help="training steps of (c); 0 skips it")
    return parser.parse_args()


def sample_and_collate_ms(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    _, data, _ = build_run(str(RECIPE), [])
    dataset = data.train
    for index in range(args.samples):  # warm the page cache and the tokenizer's word cache
        dataset.item_in_epoch(index, 0)
    per_sample, per_batch = [], []
    for repeat in range(args.repeats):
        indices = [(repeat * args.samples + offset) % len(dataset) for offset in range(args.samples)]
        start = time.perf_counter()
        for index in indices:
            dataset.item_in_epoch(index, 1)
        per_sample.append((time.perf_counter() - start) / args.samples * 1000)
        samples = [dataset.item_in_epoch(index, 1) for index in indices[:64]]
        start = time.perf_counter()
        data.collate(samples)
        per_batch.append((time.perf_counter() - start) * 1000)
    return per_sample, per_batch


def training_split(steps: int) -> tuple[float, float]:
    """(seconds of the whole run, seconds spent taking batches)."""
    taking = [0.0]
    take = batches.BatchStream.__next__

    def timed_take(stream: batches.BatchStream):
        start = time.perf_counter()
        try:
            return take(stream)
        finally:
            taking[0] += time.perf_counter() - start

    batches.BatchStream.__next__ = timed_take
    try:
        task, data, trainer = build_run(str(RECIPE), [f"demo/Trainer.total_steps = {steps}", "demo/Trainer.eval_batches = 1"])
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            trainer.fit(task, data, Path(out), echo=lambda *_: None)
            return time.perf_counter() - start, taking[0]
    finally:
        batches.BatchStream.__next__ = take


def main() -> None:
    args = parse_args()
    per_sample, per_batch = sample_and_collate_ms(args)
    print(f"(a) one training sample: {min(per_sample):.3f} ms (min), {statistics.median(per_sample):.3f} ms (median), "
          f"{args.repeats} x {args.samples} samples")
    print(f"(b) collating 64 samples: {min(per_batch):.2f} ms (min), {statistics.median(per_batch):.2f} ms (median)")
    if args.steps:
        total, taking = training_split(args.steps)
        print(f"(c) {args.steps} steps: {total:.2f} s, {total / args.steps * 1000:.0f} ms a step; "
              f"taking batches {taking:.2f} s ({taking / total:.0%}), with the first step's start-up and one validation batch")


if __name__ == "__main__":
    main()
