"""Does demo pre-training help demo VCR fine-tuning? A measurement over seeds, not a test.

Pre-trains the demo model (`recipes/demo/vlbert_demo.gin`, 400 steps), then fine-tunes
`recipes/demo/finetune_vcr.gin` (Q→A on drawn scenes: "What color is [0] ?") from scratch and
from that checkpoint, for each seed, and prints the held-out accuracy of each run (300
validation questions, chance 0.25). From scratch the model sits at chance for a number of steps
that varies with the seed before it learns to compare the colour words with the grounded
region, which is why this is a measurement rather than a test with a margin.

Usage::

    python bench/pretraining_then_vcr.py [--steps 800] [--seeds 0 1 2] [--out runs/bench_vcr]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlblocks.app.run import train_from_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="fine-tuning steps (16 questions each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_vcr"))
    args = parser.parse_args()
    quiet = lambda *_: None
    train_from_recipe(RECIPES / "vlbert_demo.gin", [], args.out / "pretraining", echo=quiet)
    checkpoint = args.out / "pretraining" / "checkpoints" / "step-0000400"
    print("seed | from scratch | from demo pre-training")
    for seed in args.seeds:
        accuracy = {}
        for start, pretrained in (("scratch", "None"), ("pretrained", f"'{checkpoint}'")):
            bindings = [f"demo/Trainer.seed = {seed}", f"demo/Trainer.total_steps = {args.steps}", f"experiment.pretrained = {pretrained}"]
            results = train_from_recipe(RECIPES / "finetune_vcr.gin", bindings, args.out / f"{start}-{seed}", echo=quiet)
            accuracy[start] = results["vcr/accuracy"]
        print(f"{seed} | {accuracy['scratch']:.3f} | {accuracy['pretrained']:.3f}", flush=True)


if __name__ == "__main__":
    main()
