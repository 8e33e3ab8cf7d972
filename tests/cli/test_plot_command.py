"""`vlblocks plot RUN_DIR... [--out PATH]`: writes the figure, says where and how many panels;
errors are one line and exit 2."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from vlblocks.app.plot import FRAME_RGB, RUN_RGB
from vlblocks.cli.app import app
from vlblocks.train.logging import JsonLinesLog


def write_run(folder, scale: float = 1.0) -> str:
    """A run folder with a trainer-written metrics.jsonl: mlm and mvrc every 5 steps, validation at 10 and 20."""
    log = JsonLinesLog(folder / "metrics.jsonl")
    for step in (5, 10, 15, 20):
        log.write({
            "step": step, "lr": 1e-5 * step, "samples_per_second": 90.0, "mlm/loss": scale * (6 - 0.1 * step), "mlm/accuracy": scale * 0.01 * step,
            "mlm/count": 100.0, "mvrc/loss": scale * (2 - 0.05 * step), "mvrc/accuracy": scale * 0.02 * step, "mvrc/count": 10.0,
            "loss": scale * (8 - 0.15 * step),
        })
        if step % 10 == 0:
            log.write({"step": step, "split": "val", "mlm/loss": scale * (5 - 0.1 * step), "mlm/accuracy": 0.1, "mlm/count": 64.0})
    return str(folder)


def test_plot_writes_the_figure_and_says_where(tmp_path, monkeypatch):
    runner = CliRunner()
    one = write_run(tmp_path / "one")
    result = runner.invoke(app, ["plot", one])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {tmp_path / 'one' / 'curves.png'}: 6 panels, 1 run\n"
    with Image.open(tmp_path / "one" / "curves.png") as image:
        assert image.format == "PNG"

    two = write_run(tmp_path / "two", scale=0.5)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plot", one, two])
    assert result.exit_code == 0 and result.output == "wrote curves.png: 6 panels, 2 runs\n", result.output
    result = runner.invoke(app, ["plot", one, two, "--out", "figures/both.png"])
    assert result.exit_code == 0 and result.output == "wrote figures/both.png: 6 panels, 2 runs\n", result.output
    with Image.open(tmp_path / "figures" / "both.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert np.all(pixels == FRAME_RGB, axis=2).any()
    assert all(np.all(pixels == colour, axis=2).any() for colour in RUN_RGB[:2])


def test_plot_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and result.output == f"error: {tmp_path / 'missing'}: no such run folder\n"

    bad = tmp_path / "bad"
    write_run(bad)
    with (bad / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 25, "loss": \n')
    result = runner.invoke(app, ["plot", str(bad)])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert result.output.startswith(f"error: {bad / 'metrics.jsonl'}, line 7: not JSON")
    assert not (bad / "curves.png").exists() and not (tmp_path / "x.png").exists()

    assert runner.invoke(app, ["plot"]).exit_code == 2  # a run folder is required
