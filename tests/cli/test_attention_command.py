import os

from PIL import Image
from typer.testing import CliRunner

from vlblocks.cli.app import app

DEMO_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "vlbert_demo.gin")


def test_attention_map_of_a_tiny_demo_checkpoint(tmp_path):
    binds = [
        f"DemoScenes.directory = '{tmp_path / 'data'}'", "DemoScenes.train = 32", "DemoScenes.val = 16",
        "NUM_LAYERS = 2", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "APPEARANCE_SIZE = 32", "FlattenRoIHead.out_channels = 32",
        "demo/Trainer.batch_size = 8", "demo/Trainer.text_batch_size = 8", "demo/Trainer.eval_batches = 1",
    ]
    options = [item for bind in binds for item in ("--bind", bind)]
    runner = CliRunner()
    trained = runner.invoke(app, ["train", DEMO_RECIPE, "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu", *options])
    assert trained.exit_code == 0, trained.output
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"

    image = Image.new("RGB", (80, 40), (200, 200, 200))
    image.paste((255, 0, 0), (4, 4, 36, 36))
    image.save(tmp_path / "scene.png")
    out = tmp_path / "map.png"
    common = ["attention", DEMO_RECIPE, "--checkpoint", str(checkpoint), "--image", str(tmp_path / "scene.png"), "--device", "cpu"]
    result = runner.invoke(
        app, [*common, "--text", "a red square", "--boxes", "4,4,36,36;44,4,76,36", "--layer", "2", "--out", str(out), *options]
    )
    assert result.exit_code == 0, result.output
    assert "layer 2 of 2, heads averaged" in result.output and "word\timage\t#1\t#2" in result.output
    rows = [line.split("\t") for line in result.output.splitlines() if line.startswith(("a\t", "red\t", "square\t"))]
    assert [row[0] for row in rows] == ["a", "red", "square"]
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row[1:])
    with Image.open(out) as drawn:
        # 3 words: 3 panels in one row, 3 * 240 + 4 * 8 = 752 wide; the 80 x 40 image is 120 high
        # in a panel, + 16 title + 2 margins = 152.
        assert drawn.format == "PNG" and drawn.size == (752, 152)

    grid = runner.invoke(app, [*common, "--text", "a dog", "--boxes", "grid", "--out", str(tmp_path / "grid.png"), *options])
    assert grid.exit_code == 0, grid.output
    assert "mean of 2 layers" in grid.output and "#9" in grid.output

    refused = runner.invoke(app, [*common, "--text", "a dog", "--out", str(tmp_path / "none.png"), *options])
    assert refused.exit_code == 2 and "vlblocks ships no detector" in refused.output
    bad_layer = runner.invoke(app, [*common, "--text", "a dog", "--boxes", "grid", "--layer", "5", "--out", str(tmp_path / "l.png"), *options])
    assert bad_layer.exit_code == 2 and "--layer '5': expected 'all' or a layer number from 1 to 2" in bad_layer.output
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "l.png").exists()
