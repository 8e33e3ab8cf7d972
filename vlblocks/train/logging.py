"""Training output: a progress line on the terminal, metrics as JSON lines, and (optionally)
TensorBoard event files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


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


TENSORBOARD_MISSING = 'Trainer.tensorboard needs the tensorboard package: pip install "vlblocks[tensorboard]"'


def tensorboard_available() -> bool:
    """Whether the optional `tensorboard` package (which `torch.utils.tensorboard` needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Writes each numeric field of a record as a TensorBoard scalar at its `step`, tagged
    '<split>/<field>' ('train/loss', 'val/mlm/accuracy'), to event files in `directory`
    (needs the optional `tensorboard` package: `pip install "vlblocks[tensorboard]"`)."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch.utils.tensorboard imports the tensorboard package
            raise ImportError(TENSORBOARD_MISSING) from None
        self.directory = Path(directory)
        self._writer_class = SummaryWriter
        self.writer: Any = SummaryWriter(str(self.directory))

    def write(self, record: dict) -> None:
        step, split = record.get("step", 0), record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def keep_until(self, step: int) -> None:
        """Hide the events after `step` from TensorBoard (a resumed run writes them again)."""
        self.writer.close()
        self.writer = self._writer_class(str(self.directory), purge_step=step + 1)


class Logs:
    """Several logs written as one (the JSON lines and, when asked, TensorBoard)."""

    def __init__(self, *logs: Any) -> None:
        self.logs = logs

    def write(self, record: dict) -> None:
        for log in self.logs:
            log.write(record)

    def keep_until(self, step: int) -> None:
        for log in self.logs:
            log.keep_until(step)


class ProgressLine:
    """A one-line progress bar with loss and throughput, redrawn in place on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        """`stream`: where to draw; None means the `sys.stderr` of the moment (not the one at import)."""
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.interactive = self.stream.isatty()

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


class NullLog:
    """A `JsonLinesLog` that writes nothing (the processes other than rank 0)."""

    def write(self, record: dict) -> None:
        pass

    def keep_until(self, step: int) -> None:
        pass


class NullProgress:
    """A `ProgressLine` that draws nothing (the processes other than rank 0)."""

    def update(self, step: int, metrics: dict[str, float], samples_per_second: float) -> None:
        pass

    def close(self) -> None:
        pass

