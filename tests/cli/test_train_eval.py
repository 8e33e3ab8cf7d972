import json
import os

from typer.testing import CliRunner

from vlblocks.cli.app import app

DEMO_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "vlbert_demo.gin")


def test_train_then_eval_from_the_command_line(tmp_path):
    binds = [
        f"DemoScenes.directory = '{tmp_path / 'data'}'", "DemoScenes.train = 64", "DemoScenes.val = 32",
        "NUM_LAYERS = 1", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "APPEARANCE_SIZE = 32", "FlattenRoIHead.out_channels = 32",
        "demo/Trainer.batch_size = 8", "demo/Trainer.text_batch_size = 8", "demo/Trainer.eval_batches = 1",
    ]
    options = [item for bind in binds for item in ("--bind", bind)]
    runner = CliRunner()
    result = runner.invoke(app, ["train", DEMO_RECIPE, "--out", str(tmp_path / "run"), "--max-steps", "3", *options])
    assert result.exit_code == 0, result.output
    assert "embedded demo dataset" in result.output and "train_annotations" in result.output
    assert "lr = 2.5e-05 per sample x 16" in result.output  # 8 caption + 8 text-only samples per step
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000003"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "training_state.pt").is_file()

    assert "validation after training:\nmetric" in result.output and "mlm/accuracy" in result.output

    result = runner.invoke(app, ["eval", DEMO_RECIPE, "--checkpoint", str(checkpoint), "--max-batches", "1", *options])
    assert result.exit_code == 0, result.output
    assert f"results: {checkpoint / 'eval.json'}" in result.output
    results = json.loads((checkpoint / "eval.json").read_text())
    assert set(results) == {"full", "image_blanked", "caption_dropped"}
    assert results["full"]["mlm/count"] > 0 and results["caption_dropped"]["mlm/count"] == 0
    header = next(line for line in result.output.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "with", "image", "image", "blanked", "caption", "dropped"]
    count_row = next(line for line in result.output.splitlines() if line.startswith("mlm/count "))
    assert count_row.split()[1:] == [str(round(results["full"]["mlm/count"])), str(round(results["image_blanked"]["mlm/count"])), "0"]

    elsewhere = tmp_path / "elsewhere.json"
    result = runner.invoke(app, ["eval", DEMO_RECIPE, "--checkpoint", str(checkpoint), "--max-batches", "1", "--json", str(elsewhere), *options])
    assert result.exit_code == 0, result.output
    assert json.loads(elsewhere.read_text()) == results

    blocked = tmp_path / "a-file"
    blocked.write_text("kept")
    result = runner.invoke(app, ["eval", DEMO_RECIPE, "--checkpoint", str(checkpoint), "--json", str(blocked / "eval.json"), *options])
    assert result.exit_code == 2 and f"{blocked / 'eval.json'}: cannot write the results" in result.output
    assert blocked.read_text() == "kept"

    missing = runner.invoke(app, ["eval", DEMO_RECIPE, "--checkpoint", str(tmp_path / "nope.safetensors"), *options])
    assert missing.exit_code == 2 and "no such checkpoint" in missing.output
