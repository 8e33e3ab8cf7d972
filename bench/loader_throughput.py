"""Region-feature loading throughput against the speed of a BERT-base training step.

Writes N synthetic images' features (R regions x D floats each) as VL-BERT per-image json files
in a temporary folder, packs them into a `FeatureStore`, then measures, single process and in
random order:

  (a) reading the per-image json files (json parse + base64 decode + validation),
  (b) reading from the memory-mapped FeatureStore,
  (c) a BERT-base training step (forward + backward + AdamW, fp32) on a batch of B sequences
      of T tokens (text + regions, a proxy for a VL-BERT step), in samples per second.

The files were just written, so (a) and (b) read from the page cache: this is the warm-cache
rate; cold reads from disk are slower for both.

Usage::

    python bench/loader_throughput.py [--images 2000] [--regions 36] [--dim 2048]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import BertConfig, BertModel

from vlblocks.data.formats.butd_features import read_feature_json
from vlblocks.data.formats.feature_store import FeatureStore, pack_features


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic images")
    parser.add_argument("--regions", type=int, default=36, help="regions per image")
    parser.add_argument("--dim", type=int, default=2048, help="feature size D")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="FeatureStore dtype")
    parser.add_argument("--batch", type=int, default=32, help="training batch size B")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence T")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed training steps (after 1 warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the files (default: a temporary folder, removed after)")
    return parser.parse_args()


def write_json_files(folder: Path, images: int, regions: int, dim: int, seed: int) -> list[Path]:
    """Writes `images` VL-BERT feature jsons: boxes [regions, 4], features [regions, dim]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(images):
        corners = rng.uniform(0, 300, (regions, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(1, 300, (regions, 2))], axis=1)
        features = rng.random((regions, dim), dtype=np.float32)
        content = {
            "image_id": index,
            "image_w": 640,
            "image_h": 640,
            "num_boxes": regions,
            "boxes": base64.b64encode(boxes.astype(np.float32).tobytes()).decode("ascii"),
            "features": base64.b64encode(features.tobytes()).decode("ascii"),
        }
        path = folder / f"{index}.json"
        path.write_text(json.dumps(content))
        paths.append(path)
    return paths


def samples_per_second(read: Callable[[object], object], keys: Sequence[object]) -> float:
    """Reads every key once, in the given order; returns reads per second."""
    start = time.perf_counter()
    for key in keys:
        read(key)
    return len(keys) / (time.perf_counter() - start)


def training_samples_per_second(batch: int, tokens: int, steps: int, seed: int) -> float:
    """Times BERT-base forward + backward + AdamW steps (fp32, CPU) after one warm-up step."""
    torch.manual_seed(seed)
    model = BertModel(BertConfig())  # BERT-base: hidden 768, 12 layers, 12 heads
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)

    def step() -> None:
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        loss = output.last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="vlblocks-bench-") as temporary:
        root = args.workdir or Path(temporary)
        start = time.perf_counter()
        paths = write_json_files(root / "json", args.images, args.regions, args.dim, args.seed)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        pack_features((read_feature_json(path) for path in paths), root / "store", args.dtype)
        pack_s = time.perf_counter() - start
        store = FeatureStore(root / "store")

        order = list(range(args.images))
        random.Random(args.seed).shuffle(order)
        json_rate = samples_per_second(read_feature_json, [paths[i] for i in order])
        ids = store.image_ids()
        store_rate = samples_per_second(store.__getitem__, [ids[i] for i in order])
    train_rate = training_samples_per_second(args.batch, args.tokens, args.steps, args.seed)

    mib = args.regions * args.dim * 4 / 2**20
    print(f"{args.images} images x {args.regions} regions x {args.dim}-d "
          f"({mib:.2f} MiB float32 per image); torch threads: {torch.get_num_threads()}")
    print(f"setup: wrote json files in {write_s:.1f} s, packed ({args.dtype}) in {pack_s:.1f} s")
    print()
    print(f"{'reader':<44} {'samples/s':>10}")
    print(f"{'(a) per-image json (base64), random order':<44} {json_rate:>10.0f}")
    print(f"{'(b) FeatureStore ' + args.dtype + ', random order':<44} {store_rate:>10.0f}")
    label = f"(c) BERT-base train step, B={args.batch} T={args.tokens}"
    print(f"{label:<44} {train_rate:>10.1f}")
    print()
    print(f"store / training  = {store_rate / train_rate:.0f}x  (target >= 10x)")
    print(f"json  / training  = {json_rate / train_rate:.0f}x")
    print(f"store / json      = {store_rate / json_rate:.1f}x")


if __name__ == "__main__":
    main()
