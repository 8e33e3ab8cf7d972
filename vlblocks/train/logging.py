"""Training output: a progress line on the terminal and metrics as JSON lines."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO


class JsonLinesLog:
    """Appends one JSON object per call to `path`, flushed at once, each with the wall-clock
    `time` (seconds since the epoch) at which it was written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (a resumed run writes them again); a missing log stays missing."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(True) if json.loads(line).get("step", 0) <= step]
        temporary = self.path.with_suffix(".partial")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, self.path)


class ProgressLine:
    """A one-line progress bar with loss and throughput, redrawn in place on a terminal."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 24) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.start = time.perf_counter()
        self.interactive = stream.isatty()

    def update(self, step: int, metrics: dict[str, float], samples_per_second: float) -> None:
        done = int(self.width * step / max(1, self.total))
        shown = " ".join(f"{k.replace('/', '_')} {v:.3f}" for k, v in metrics.items() if not k.endswith("/count"))
        line = f"[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {shown} | {samples_per_second:.1f} samples/s"
        if self.interactive:
            self.stream.write("\r" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()
