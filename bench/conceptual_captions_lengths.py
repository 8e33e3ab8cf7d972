"""How long length bucketing takes to read a Conceptual Captions record's length.

Writes N records in the official layout (`train_frcnn.json` and a stored `train_frcnn.zip` of
bottom-up-attention detection JSONs: 10-100 boxes, 1601 class scores each, optionally 2048-d
features) in a temporary folder, then measures per record, alternating the two ways in each
repetition:

  (a) the whole record, as `reader[i]` reads it for training (JSON parse, base64 decode and
      checks of every array, boxes sorted): how lengths were read before;
  (b) `ConceptualCaptionsReader.length(i)`: the caption and the detection file's `num_boxes`,
      its arrays left undecoded.

`--num-boxes-last` writes `num_boxes` after the arrays (files written by Python 2 have their keys
in hash order), so (b) searches the whole file. The files were just written, so both read from
the page cache.

Usage::

    python bench/conceptual_captions_lengths.py [--records 300] [--features] [--num-boxes-last]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader, b64_float32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--classes", type=int, default=1601, help="class scores per box (Visual Genome's 1600 + background)")
    parser.add_argument("--features", action="store_true", help="also store 2048-d features per box")
    parser.add_argument("--num-boxes-last", action="store_true", help="write num_boxes after the arrays")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def detection_json(generator: np.random.Generator, classes: int, features: bool, num_boxes_last: bool) -> str:
    """One image's detections: valid boxes, a softmax-like score row per box."""
    count = int(generator.integers(10, 101))
    corner = generator.uniform(0, 400, (count, 2))
    boxes = np.concatenate([corner, corner + generator.uniform(1, 200, (count, 2))], axis=1)
    scores = generator.dirichlet(np.ones(classes), count)
    arrays = {"boxes": b64_float32(boxes), "classes": b64_float32(scores)}
    if features:
        arrays["features"] = b64_float32(generator.random((count, 2048)))
    sizes = {"image_h": 600, "image_w": 800}
    counted = {"num_boxes": count}
    fields = {**sizes, **arrays, **counted} if num_boxes_last else {**sizes, **counted, **arrays}
    return json.dumps(fields)


def write_records(folder: Path, args: argparse.Namespace) -> Path:
    generator = np.random.default_rng(args.seed)
    annotation = folder / "train_frcnn.json"
    with zipfile.ZipFile(folder / "train_frcnn.zip", "w", zipfile.ZIP_STORED) as archive, open(annotation, "w") as lines:
        for index in range(args.records):
            archive.writestr(f"{index:08d}.json", detection_json(generator, args.classes, args.features, args.num_boxes_last))
            caption = ["a", "photo", "of", "word"] * int(generator.integers(1, 6))
            lines.write(json.dumps({"image": f"train_image.zip@/{index:08d}.jpg", "caption": caption, "frcnn": f"train_frcnn.zip@/{index:08d}.json"}) + "\n")
    return annotation


def per_record_ms(read: Callable[[int], int], count: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    lengths = [read(index) for index in range(count)]
    return (time.perf_counter() - start) / count * 1000, lengths


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reader = ConceptualCaptionsReader(write_records(Path(folder), args))
        size = (Path(folder) / "train_frcnn.zip").stat().st_size / args.records / 1e3

        def whole(index: int) -> int:
            example = reader[index]
            return len(example.caption) + len(example.boxes)

        timings: dict[str, list[float]] = {"whole record": [], "length()": []}
        for _ in range(args.repeats):
            whole_ms, expected = per_record_ms(whole, args.records)
            length_ms, lengths = per_record_ms(reader.length, args.records)
            assert lengths == expected, "the two ways disagree"
            timings["whole record"].append(whole_ms)
            timings["length()"].append(length_ms)
    layout = "num_boxes after the arrays" if args.num_boxes_last else "num_boxes before the arrays"
    print(f"{args.records} records, {size:.0f} KB of detections each on average, {args.classes} classes, "
          f"{'with' if args.features else 'no'} features, {layout}; median of {args.repeats}")
    print(f"{'way':<14} {'ms per record':>14}")
    for name, values in timings.items():
        print(f"{name:<14} {statistics.median(values):>14.3f}")
    print(f"speed-up: {statistics.median(timings['whole record']) / statistics.median(timings['length()']):.1f}x")


if __name__ == "__main__":
    main()
