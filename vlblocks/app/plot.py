"""`vlblocks plot`: the training curves of one or more run folders as one PNG (Pillow only).

Each run folder's `metrics.jsonl` (written by `vlblocks train --out RUN_DIR`, one JSON object per
line; validation records carry `"split": "val"`) becomes one curve per metric. The figure has one
row of panels per objective (the part of the metric name before '/': `mlm`, `mvrc`, `itm`, ...),
one panel per metric in that row (loss first, then accuracy, then the rest by name), each on its
own value scale; the first row holds the run-wide metrics: the total `loss` and the learning rate
`lr` (its schedule explains bends in the other curves). The x axis is the optimiser step, the same
range in every panel. Training is a solid line, validation a dashed line with a dot at each
evaluation; each run has its colour, named in the legend under the panels.

Left out: `time`, `samples_per_second`, `skipped_steps`, `loss_scale`, counts (`*/count`), the
`data/*` bookkeeping and `event` records (skipped steps); values that are not finite numbers are
skipped (the curve joins its neighbours). A step logged twice keeps its last value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from vlblocks.app.files import write_atomically
from vlblocks.contracts import Echo

METRICS_FILE = "metrics.jsonl"
FIGURE_FILE = "curves.png"
LEFT_OUT = frozenset({"step", "split", "time", "samples_per_second", "skipped_steps", "loss_scale"})
RUN_WIDE = ""  # the objective of metrics without a '/' (the total loss, the learning rate)
LEAF_ORDER = {"loss": 0, "lr": 1, "accuracy": 1}  # within a row: loss, then accuracy (or lr), then by name

COLUMNS = 3  # panels per row at most; an objective with more metrics continues on the next row
MARGIN = 12  # around the figure and between panels
TITLE_HEIGHT = 18  # the band above a panel's frame that names its metric
AXIS_WIDTH = 52  # left of a frame: the value ticks' numbers
PLOT_WIDTH = 260  # a panel's frame
PLOT_HEIGHT = 150
STEP_LABEL_HEIGHT = 16  # under a frame: the step ticks' numbers
RIGHT_GAP = 18  # right of a frame, inside its panel (room for the last step number)
INSET = 6  # curves keep this far inside the frame
LEGEND_LINE = 16
TICKS = 5  # about this many ticks per axis

BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
FRAME_RGB = (70, 80, 100)  # the frames alone have it (not a grey: text's anti-aliasing makes greys), so a reader of the PNG finds the panels
TITLE_BAND_RGB = (232, 236, 244)
GRID_RGB = (228, 228, 228)
RUN_RGB = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # one per run, repeating after ten


class PlotError(ValueError):
    """A run folder or its metrics.jsonl cannot be plotted; the message names the file (and line)."""


Points = list[tuple[int, float]]  # (step, value), by step


@dataclass
class RunCurves:
    """One run's curves.

    Attributes:
        name: how the legend names the run (the folder as given).
        train: metric -> its training points.
        val: metric -> its validation points.
        keys: every metric of `train` and `val`, in the order the log first wrote it.
    """

    name: str
    train: dict[str, Points] = field(default_factory=dict)
    val: dict[str, Points] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Box:
    """A rectangle in figure pixels; `right` and `bottom` included."""

    left: int
    top: int
    right: int
    bottom: int

    def contains(self, x: float, y: float) -> bool:
        return self.left <= x <= self.right and self.top <= y <= self.bottom


@dataclass(frozen=True)
class Panel:
    """Where one metric is drawn: `cell` holds its title band, value and step numbers and `frame`."""

    key: str
    cell: Box
    frame: Box


def metrics_file(run_dir: str | Path) -> Path:
    """The metrics.jsonl of `run_dir` (or `run_dir` itself when it is a file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run folder")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: missing (is {run_dir} a folder written by `vlblocks train --out`?)")
    return path


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one per non-blank line, each with an integer `step`."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}, line {number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}, line {number}: expected a JSON object with an integer 'step', got {line[:80]!r}")
        records.append(record)
    return records


def is_plotted(key: str, value: object) -> bool:
    """Whether the record field `key` = `value` is drawn (a finite number, not bookkeeping)."""
    if key in LEFT_OUT or key.endswith("/count") or key.startswith("data/"):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves_from_records(records: Sequence[dict], name: str) -> RunCurves:
    """The training and validation points of every plotted metric of `records` (see `is_plotted`),
    by step; a step written twice keeps its last value; `event` records are left out."""
    run = RunCurves(name)
    collected: dict[str, dict[str, dict[int, float]]] = {"train": {}, "val": {}}
    for record in records:
        if "event" in record:
            continue
        split = "val" if record.get("split") == "val" else "train"
        for key, value in record.items():
            if is_plotted(key, value):
                collected[split].setdefault(key, {})[record["step"]] = float(value)
                if key not in run.keys:
                    run.keys.append(key)
    run.train = {key: sorted(points.items()) for key, points in collected["train"].items()}
    run.val = {key: sorted(points.items()) for key, points in collected["val"].items()}
    return run


def read_curves(run_dir: str | Path) -> RunCurves:
    """The curves of one run folder, named as given.

    Raises:
        PlotError: no folder, no metrics.jsonl, a line that is not a JSON object with a step, or no
            plottable record.
    """
    path = metrics_file(run_dir)
    run = curves_from_records(read_records(path), str(run_dir))
    if not run.keys:
        raise PlotError(f"{path}: no records to plot (a run writes its first at step Trainer.log_every)")
    return run


def objective(key: str) -> str:
    """'mlm/accuracy' -> 'mlm'; a metric without '/' ('loss', 'lr') -> `RUN_WIDE`."""
    return key.split("/", 1)[0] if "/" in key else RUN_WIDE


def panel_rows(runs: Sequence[RunCurves]) -> list[list[str]]:
    """The metrics of the figure, a row per objective (`RUN_WIDE` first, then in the order the logs
    first wrote them), loss then accuracy (or lr) then by name, at most `COLUMNS` a row."""
    groups: dict[str, list[str]] = {RUN_WIDE: []}
    for run in runs:
        for key in run.keys:
            keys = groups.setdefault(objective(key), [])
            if key not in keys:
                keys.append(key)
    rows = []
    for keys in groups.values():
        ordered = sorted(keys, key=lambda key: (LEAF_ORDER.get(key.rsplit("/", 1)[-1], 2), key))
        rows += [ordered[start : start + COLUMNS] for start in range(0, len(ordered), COLUMNS)]
    return rows


def panel_layout(rows: Sequence[Sequence[str]]) -> list[Panel]:
    """Where each metric of `rows` is drawn, row by row; cells never overlap."""
    cell_width, cell_height = AXIS_WIDTH + PLOT_WIDTH + RIGHT_GAP, TITLE_HEIGHT + PLOT_HEIGHT + STEP_LABEL_HEIGHT
    panels = []
    for row, keys in enumerate(rows):
        for column, key in enumerate(keys):
            left, top = MARGIN + column * (cell_width + MARGIN), MARGIN + row * (cell_height + MARGIN)
            frame = Box(left + AXIS_WIDTH, top + TITLE_HEIGHT, left + AXIS_WIDTH + PLOT_WIDTH - 1, top + TITLE_HEIGHT + PLOT_HEIGHT - 1)
            panels.append(Panel(key, Box(left, top, left + cell_width - 1, top + cell_height - 1), frame))
    return panels


def figure_size(rows: Sequence[Sequence[str]], runs: int) -> tuple[int, int]:
    """(width, height) of a figure of `rows` of panels over a legend of `runs` runs (+ a key line)."""
    columns = max((len(keys) for keys in rows), default=1)
    width = MARGIN + columns * (AXIS_WIDTH + PLOT_WIDTH + RIGHT_GAP + MARGIN)
    height = MARGIN + len(rows) * (TITLE_HEIGHT + PLOT_HEIGHT + STEP_LABEL_HEIGHT + MARGIN) + (runs + 1) * LEGEND_LINE + MARGIN
    return width, height


def nice_ticks(low: float, high: float, count: int = TICKS) -> list[float]:
    """Round numbers from `low` to `high`, 1, 2, 2.5 or 5 times a power of ten apart: the
    smallest such step that cuts the range into at most `count` parts (2 to `count` + 1 ticks)."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(multiple * power for multiple in (1, 2, 2.5, 5, 10) if multiple * power >= raw * (1 - 1e-9))
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [round(index * step, 12) for index in range(first, last + 1)]


def format_tick(value: float) -> str:
    """A tick's number, short: '0', '25', '0.25', '5e-05', '12k', '1.5M'."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6 and float(value).is_integer():
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e4 and float(value).is_integer():
        return f"{value / 1e3:g}k"
    return f"{value:.4g}"


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of a panel's axis: the values' range, widened around a single value."""
    low, high = min(values), max(values)
    if high > low:
        return low, high
    pad = abs(low) * 0.1 if low else 0.5
    return low - pad, high + pad


def draw_curves(runs: Sequence[RunCurves]) -> tuple[Image.Image, list[Panel]]:
    """The figure of `runs` (see the module) and its panels (`panel_layout(panel_rows(runs))`)."""
    rows = panel_rows(runs)
    panels = panel_layout(rows)
    figure = Image.new("RGB", figure_size(rows, len(runs)), BACKGROUND_RGB)
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    steps = [step for run in runs for curves in (run.train, run.val) for points in curves.values() for step, _ in points]
    step_range = value_range(steps)
    for panel in panels:
        _draw_panel(draw, font, panel, runs, step_range)
    _draw_legend(draw, font, runs, top=max(panel.cell.bottom for panel in panels) + 1 + MARGIN, width=figure.width)
    return figure, panels


def plot_runs(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None, echo: Echo = lambda line: None) -> Path:
    """Read the metrics.jsonl of each of `run_dirs`, draw their curves overlaid (see the module) and
    write the PNG to `out` (a folder gets curves.png; default: `default_output`), atomically.
    Echoes where it wrote and how many panels; returns the path written.

    Raises:
        PlotError: no run folder given, or one cannot be read (see `read_curves`).
    """
    if not run_dirs:
        raise PlotError("no run folder given")
    runs = [read_curves(run_dir) for run_dir in run_dirs]
    target = Path(out) if out is not None else default_output(run_dirs)
    if target.is_dir():
        target = target / FIGURE_FILE
    figure, panels = draw_curves(runs)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda temporary: figure.save(temporary, format="PNG"))
    echo(f"wrote {target}: {len(panels)} panels, {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return target


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """RUN_DIR/curves.png for one run folder (beside the file for a metrics file), curves.png in the
    working directory for several."""
    if len(run_dirs) != 1:
        return Path(FIGURE_FILE)
    run_dir = Path(run_dirs[0])
    return (run_dir.parent if run_dir.is_file() else run_dir) / FIGURE_FILE


def _draw_panel(draw: ImageDraw.ImageDraw, font, panel: Panel, runs: Sequence[RunCurves], step_range: tuple[float, float]) -> None:
    """Title band, grid, ticks with numbers, frame, then each run's training and validation curves."""
    frame, cell = panel.frame, panel.cell
    draw.rectangle([frame.left, cell.top, frame.right, frame.top - 3], fill=TITLE_BAND_RGB)
    draw.text((frame.left + 4, cell.top + 2), "loss (total)" if panel.key == "loss" else panel.key, fill=TEXT_RGB, font=font)
    values = [value for run in runs for curves in (run.train, run.val) for _, value in curves.get(panel.key, [])]
    value_low, value_high = value_range(values)

    def x_of(step: float) -> float:
        return frame.left + INSET + (step - step_range[0]) / (step_range[1] - step_range[0]) * (frame.right - frame.left - 2 * INSET)

    def y_of(value: float) -> float:
        return frame.bottom - INSET - (value - value_low) / (value_high - value_low) * (frame.bottom - frame.top - 2 * INSET)

    for tick in nice_ticks(value_low, value_high):
        y = round(y_of(tick))
        draw.line([frame.left + 1, y, frame.right - 1, y], fill=GRID_RGB)
        draw.line([frame.left - 4, y, frame.left - 1, y], fill=TEXT_RGB)
        label = format_tick(tick)
        draw.text((frame.left - 6 - draw.textlength(label, font=font), y - 6), label, fill=TEXT_RGB, font=font)
    for tick in nice_ticks(*step_range):
        x = round(x_of(tick))
        draw.line([x, frame.top + 1, x, frame.bottom - 1], fill=GRID_RGB)
        draw.line([x, frame.bottom + 1, x, frame.bottom + 3], fill=TEXT_RGB)
        label = format_tick(tick)
        width = draw.textlength(label, font=font)
        draw.text((min(max(x - width / 2, cell.left), cell.right - width), frame.bottom + 3), label, fill=TEXT_RGB, font=font)
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline=FRAME_RGB)
    for index, run in enumerate(runs):
        colour = RUN_RGB[index % len(RUN_RGB)]
        train = [(x_of(step), y_of(value)) for step, value in run.train.get(panel.key, [])]
        if len(train) > 1:
            draw.line(train, fill=colour, width=2, joint="curve")
        for x, y in train[:1] if len(train) == 1 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        val = [(x_of(step), y_of(value)) for step, value in run.val.get(panel.key, [])]
        _dashed(draw, val, colour)
        for x, y in val:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _dashed(
    draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], colour: tuple[int, int, int], dash: float = 5.0, gap: float = 4.0
) -> None:
    """A dashed polyline through `points` (the pattern runs on across corners)."""
    position = 0.0  # along the pattern of length dash + gap
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            drawing = position < dash
            piece = min((dash - position) if drawing else (dash + gap - position), length - done)
            if drawing:
                start, end = done / length, (done + piece) / length
                draw.line([x0 + (x1 - x0) * start, y0 + (y1 - y0) * start, x0 + (x1 - x0) * end, y0 + (y1 - y0) * end], fill=colour, width=1)
            done += piece
            position = (position + piece) % (dash + gap)


def _draw_legend(draw: ImageDraw.ImageDraw, font, runs: Sequence[RunCurves], top: int, width: int) -> None:
    """A key line (solid: training, dashed with dots: validation, x: step), then a line per run in its colour."""
    left = MARGIN
    draw.line([left, top + 7, left + 24, top + 7], fill=TEXT_RGB, width=2)
    draw.text((left + 30, top + 1), "training", fill=TEXT_RGB, font=font)
    middle = left + 30 + draw.textlength("training", font=font) + 16
    _dashed(draw, [(middle, top + 7), (middle + 24, top + 7)], TEXT_RGB)
    draw.ellipse([middle + 9, top + 4, middle + 15, top + 10], fill=TEXT_RGB)
    draw.text((middle + 30, top + 1), "validation        x axis: optimiser step", fill=TEXT_RGB, font=font)
    for index, run in enumerate(runs):
        y = top + (index + 1) * LEGEND_LINE
        draw.line([left, y + 7, left + 24, y + 7], fill=RUN_RGB[index % len(RUN_RGB)], width=4)
        name, room = run.name, width - (left + 30) - MARGIN
        while len(name) > 1 and draw.textlength(name, font=font) > room:  # keep the end of a long path
            name = "…" + name[2:]
        draw.text((left + 30, y + 1), name, fill=TEXT_RGB, font=font)
