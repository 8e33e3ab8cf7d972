"""`vlblocks plot`'s figure: metrics.jsonl records in the trainer's own format (written through
`JsonLinesLog`) become one framed panel per metric, grouped by objective, with each run's curves."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlblocks.app.plot import (
    COLUMNS,
    FRAME_RGB,
    RUN_RGB,
    TITLE_BAND_RGB,
    Box,
    PlotError,
    curves_from_records,
    figure_size,
    format_tick,
    nice_ticks,
    panel_layout,
    panel_rows,
    plot_runs,
    read_curves,
)
from vlblocks.app.run import train_from_recipe
from vlblocks.train.logging import JsonLinesLog

DEMO_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "vlbert_demo.gin")
EXPECTED_ROWS = [["loss", "lr"], ["mlm/loss", "mlm/accuracy"], ["mvrc/loss", "mvrc/accuracy"], ["itm/loss", "itm/accuracy"]]


def pretraining_records(scale: float = 1.0, changes: dict | None = None) -> list[dict]:
    """Records as `Trainer` logs them: training every 5 steps (lr, throughput, per-objective loss,
    accuracy and count, total loss), validation every 10 (`"split": "val"`, no lr). `changes` maps
    (step, split, key) to a value replacing the made-up one."""
    records = []
    for step in (5, 10, 15, 20, 25, 30):
        train = {"step": step, "lr": scale * 1e-5 * step, "samples_per_second": 100.0 + step}
        for index, name in enumerate(("mlm", "mvrc", "itm")):
            train |= {f"{name}/loss": scale * (6.0 - index - 0.1 * step), f"{name}/accuracy": scale * 0.02 * step / (index + 1)}
            train[f"{name}/count"] = 200.0
        train["loss"] = sum(train[f"{name}/loss"] for name in ("mlm", "mvrc", "itm"))
        records.append(train)
        if step % 10 == 0:
            val = {"step": step, "split": "val"}
            for index, name in enumerate(("mlm", "mvrc", "itm")):
                val |= {f"{name}/loss": scale * (5.5 - index - 0.1 * step), f"{name}/accuracy": scale * 0.018 * step / (index + 1)}
                val[f"{name}/count"] = 64.0
            records.append(val)
    for (step, split, key), value in (changes or {}).items():
        [record] = [r for r in records if r["step"] == step and r.get("split", "train") == split]
        record[key] = value
    return records


def write_run(folder, records) -> str:
    """A run folder whose metrics.jsonl holds `records`, written by the trainer's log."""
    log = JsonLinesLog(folder / "metrics.jsonl")
    for record in records:
        log.write(record)
    return str(folder)


def frames_in(pixels: np.ndarray) -> list[Box]:
    """Every rectangle outlined in `FRAME_RGB` in an [H, W, 3] image, found from the pixels alone:
    a top-left corner (frame colour right and below, none left and above) traced to its extent,
    kept when all four edges are frame-coloured."""
    mask = np.all(pixels == FRAME_RGB, axis=2)
    padded = np.pad(mask, 1)
    corners = mask & padded[1:-1, 2:] & padded[2:, 1:-1] & ~padded[1:-1, :-2] & ~padded[:-2, 1:-1]
    boxes = []
    for y, x in zip(*np.nonzero(corners)):
        right = x + int(np.argmin(np.append(mask[y, x:], False))) - 1
        bottom = y + int(np.argmin(np.append(mask[y:, x], False))) - 1
        if mask[bottom, x : right + 1].all() and mask[y : bottom + 1, right].all():
            boxes.append(Box(int(x), int(y), int(right), int(bottom)))
    return boxes


def pixels_of(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def inside(pixels: np.ndarray, box: Box) -> np.ndarray:
    return pixels[box.top : box.bottom + 1, box.left : box.right + 1]


def has_colour(pixels: np.ndarray, colour) -> bool:
    return bool(np.all(pixels == colour, axis=2).any())


def test_metrics_are_grouped_into_a_row_per_objective():
    records = pretraining_records()
    records.insert(3, {"step": 12, "event": "overflow_skipped", "loss_scale": 32768.0, "time": 1.0})
    records.append({"step": 30, "lr": 3e-4, "mlm/loss": float("nan"), "mlm/accuracy": 0.9, "skipped_steps": 1, "data/skipped": 2.0})
    run = curves_from_records(records, "run")
    assert panel_rows([run]) == EXPECTED_ROWS  # counts, throughput, time, events and bookkeeping left out
    assert run.train["mlm/accuracy"][-1] == (30, 0.9)  # a step written twice keeps its last value
    assert run.train["mlm/loss"][-1] == (30, pytest.approx(3.0))  # NaN skipped: the earlier value stays
    assert [step for step, _ in run.val["mvrc/loss"]] == [10, 20, 30] and "lr" not in run.val
    assert [step for step, _ in run.train["loss"]] == [5, 10, 15, 20, 25, 30]

    wide = curves_from_records([{"step": 1, "vcr/zeta": 1.0, "vcr/accuracy": 0.5, "vcr/loss": 2.0, "vcr/alpha": 3.0, "loss": 2.0}], "wide")
    assert COLUMNS == 3 and panel_rows([wide]) == [["loss"], ["vcr/loss", "vcr/accuracy", "vcr/alpha"], ["vcr/zeta"]]
    other = curves_from_records([{"step": 1, "itm/loss": 1.0, "vqa/accuracy": 0.5}], "other")
    assert panel_rows([other, run]) == [
        ["loss", "lr"], ["itm/loss", "itm/accuracy"], ["vqa/accuracy"], ["mlm/loss", "mlm/accuracy"], ["mvrc/loss", "mvrc/accuracy"],
    ]


def test_ticks_are_round_numbers_inside_the_range():
    assert nice_ticks(4.5, 5.49) == [4.6, 4.8, 5.0, 5.2, 5.4]
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(25, 800) == [200.0, 400.0, 600.0, 800.0]
    assert nice_ticks(1e-5, 4.5e-4) == [1e-4, 2e-4, 3e-4, 4e-4]
    assert nice_ticks(3.0, 3.0) == [3.0]
    assert [format_tick(v) for v in (0.0, -0.0, 25.0, 0.25, 5e-5, 12000.0, 1500000.0, 4.6)] == ["0", "0", "25", "0.25", "5e-05", "12k", "1.5M", "4.6"]


def test_the_figure_has_one_frame_per_panel(tmp_path):
    run = write_run(tmp_path / "run", pretraining_records())
    said = []
    written = plot_runs([run], echo=said.append)
    assert written == tmp_path / "run" / "curves.png"
    assert said == [f"wrote {written}: 8 panels, 1 run"]
    assert sorted(os.listdir(tmp_path / "run")) == ["curves.png", "metrics.jsonl"]  # no temporary left behind

    pixels = pixels_of(written)
    panels = panel_layout(EXPECTED_ROWS)
    assert pixels.shape == (*figure_size(EXPECTED_ROWS, 1)[::-1], 3)
    assert frames_in(pixels) == [panel.frame for panel in panels]  # 8 frames, where the layout says
    for panel in panels:
        assert np.all(pixels[panel.frame.top - 3, panel.frame.left : panel.frame.right + 1] == TITLE_BAND_RGB)  # under its title
        assert has_colour(inside(pixels, panel.frame), RUN_RGB[0])  # its curve
    for one, other in zip(panels, panels[1:]):
        assert one.cell.right < other.cell.left or one.cell.bottom < other.cell.top


@pytest.mark.parametrize("change", [(15, "train", "mlm/accuracy", 0.9), (20, "val", "mvrc/loss", 1.5), (30, "train", "lr", 0.0)])
def test_a_changed_value_changes_its_panel_and_nothing_else(tmp_path, change):
    *where, value = change
    run = write_run(tmp_path / "run", pretraining_records())
    before = pixels_of(plot_runs([run], tmp_path / "before.png"))
    (tmp_path / "run" / "metrics.jsonl").unlink()
    write_run(tmp_path / "run", pretraining_records(changes={tuple(where): value}))
    after = pixels_of(plot_runs([run], tmp_path / "after.png"))

    [panel] = [panel for panel in panel_layout(EXPECTED_ROWS) if panel.key == where[2]]
    changed = np.any(before != after, axis=2)
    assert inside(changed, panel.frame).any()
    assert changed.sum() == inside(changed, panel.cell).sum()


def test_several_runs_overlay_in_their_colours(tmp_path, monkeypatch):
    first = write_run(tmp_path / "first", pretraining_records())
    second = write_run(tmp_path / "second", pretraining_records(scale=0.7))
    monkeypatch.chdir(tmp_path)
    said = []
    written = plot_runs([first, second], echo=said.append)
    assert written.resolve() == (tmp_path / "curves.png").resolve() and said == ["wrote curves.png: 8 panels, 2 runs"]

    pixels = pixels_of(written)
    panels = panel_layout(EXPECTED_ROWS)
    assert pixels.shape == (*figure_size(EXPECTED_ROWS, 2)[::-1], 3) and len(frames_in(pixels)) == 8
    for panel in panels:
        assert has_colour(inside(pixels, panel.frame), RUN_RGB[0]) and has_colour(inside(pixels, panel.frame), RUN_RGB[1]), panel.key
    legend = pixels[max(panel.cell.bottom for panel in panels) + 1 :]
    assert has_colour(legend, RUN_RGB[0]) and has_colour(legend, RUN_RGB[1]) and not has_colour(legend, RUN_RGB[2])

    into = tmp_path / "figures"
    into.mkdir()
    assert plot_runs([first, second], into) == into / "curves.png" and (into / "curves.png").is_file()


def test_unreadable_runs_are_named(tmp_path):
    with pytest.raises(PlotError, match="nowhere: no such run folder"):
        read_curves(tmp_path / "nowhere")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(PlotError, match=r"empty_folder/metrics.jsonl: missing"):
        read_curves(tmp_path / "empty_folder")

    lines = [json.dumps(record) for record in pretraining_records()[:2]]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:-5], lines[0]]) + "\n")
    with pytest.raises(PlotError, match=r"bad/metrics.jsonl, line 2: not JSON"):
        read_curves(bad)
    (bad / "metrics.jsonl").write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(PlotError, match=r"bad/metrics.jsonl, line 2: expected a JSON object with an integer 'step'"):
        read_curves(bad)
    (bad / "metrics.jsonl").write_text(lines[0] + '\n{"step": "5", "loss": 1.0}\n')
    with pytest.raises(PlotError, match=r"line 2: expected a JSON object with an integer 'step'"):
        read_curves(bad)

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    (quiet / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match=r"quiet/metrics.jsonl: no records to plot"):
        read_curves(quiet)
    (quiet / "metrics.jsonl").write_text('{"step": 3, "event": "nan_skipped", "time": 1.0}\n\n')
    with pytest.raises(PlotError, match=r"quiet/metrics.jsonl: no records to plot"):
        read_curves(quiet)

    good = write_run(tmp_path / "good", pretraining_records())
    (tmp_path / "curves.png").write_bytes(b"the previous figure")
    with pytest.raises(PlotError, match="bad/metrics.jsonl, line 2"):
        plot_runs([good, bad], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes() == b"the previous figure"
    assert isinstance(PlotError("x"), ValueError)


def test_the_curves_of_a_real_tiny_run(tmp_path):
    bindings = [
        f"DemoScenes.directory = '{tmp_path / 'data'}'", "DemoScenes.train = 48", "DemoScenes.val = 16", "HIDDEN_SIZE = 32",
        "NUM_LAYERS = 2", "INTERMEDIATE_SIZE = 64", "FlattenRoIHead.out_channels = 32", "APPEARANCE_SIZE = 32",
        "demo/Trainer.total_steps = 6", "demo/Trainer.batch_size = 8", "demo/Trainer.text_batch_size = 4",
        "demo/Trainer.warmup_steps = 2", "demo/Trainer.log_every = 2", "demo/Trainer.eval_every = 3", "demo/Trainer.eval_batches = 1",
    ]
    train_from_recipe(DEMO_RECIPE, bindings, tmp_path / "run", echo=lambda *_: None, device="cpu")
    run = read_curves(tmp_path / "run")
    rows = panel_rows([run])
    assert rows[0] == ["loss", "lr"] and ["mlm/loss", "mlm/accuracy"] in rows and ["mvrc/loss", "mvrc/accuracy"] in rows
    assert [step for step, _ in run.train["loss"]] == [2, 4, 6] and [step for step, _ in run.val["mlm/loss"]] == [3, 6]

    pixels = pixels_of(plot_runs([tmp_path / "run"]))
    panels = panel_layout(rows)
    assert frames_in(pixels) == [panel.frame for panel in panels]
    assert all(has_colour(inside(pixels, panel.frame), RUN_RGB[0]) for panel in panels)
