"""`vlblocks eval-vcr-joint` on two demo VCR runs (Q->A and QA->R) trained for a few steps."""

import json
import os

import pytest
from typer.testing import CliRunner

from vlblocks.app.run import eval_from_recipe, train_from_recipe
from vlblocks.cli.app import app

VCR_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "finetune_vcr.gin")


def test_joint_accuracy_of_a_q2a_and_a_qa2r_checkpoint(demo_tasks, tmp_path):
    directory = demo_tasks["vcr"].root.parent.parent
    shared = [
        "NUM_LAYERS = 1", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "APPEARANCE_SIZE = 32", "FlattenRoIHead.out_channels = 32",
        f"DemoScenes.directory = '{directory}'", "DemoScenes.train = 96", "DemoScenes.val = 32",
        "demo/Trainer.total_steps = 3", "demo/Trainer.batch_size = 8", "demo/Trainer.warmup_steps = 1", "demo/Trainer.eval_batches = 1",
    ]
    checkpoints = {}
    for mode in ("q2a", "qa2r"):
        train_from_recipe(VCR_DEMO, shared + [f"vcr_data.task = '{mode}'"], tmp_path / mode, echo=lambda *_: None)
        checkpoints[mode] = tmp_path / mode / "checkpoints" / "step-0000003"

    # Every bind goes to both recipes, so the mode is left to a binding of each run's own recipe file.
    recipes = {}
    for mode in ("q2a", "qa2r"):
        recipes[mode] = tmp_path / f"vcr_{mode}.gin"
        recipes[mode].write_text(f"include '{os.path.abspath(VCR_DEMO)}'\nvcr_data.task = '{mode}'\n")
    options = [item for bind in shared for item in ("--bind", bind)]
    result = CliRunner().invoke(app, [
        "eval-vcr-joint", "--answer-recipe", str(recipes["q2a"]), "--answer-checkpoint", str(checkpoints["q2a"]),
        "--rationale-recipe", str(recipes["qa2r"]), "--rationale-checkpoint", str(checkpoints["qa2r"]), "--batch-size", "8",
        "--json", str(tmp_path / "joint.json"), *options,
    ])
    assert result.exit_code == 0, result.output
    joint = json.loads((tmp_path / "joint.json").read_text())
    assert joint["count"] == 32
    assert "\ncount              32\n" in result.output  # one column, 'full', the count as an integer

    # Each model's own accuracy equals what `vlblocks eval` reports for it over the same 32 questions.
    for mode, key in (("q2a", "q2a/accuracy"), ("qa2r", "qa2r/accuracy")):
        alone = eval_from_recipe(str(recipes[mode]), shared, checkpoints[mode], batch_size=8)["full"]
        assert alone["vcr/count"] == 32 and joint[key] == pytest.approx(alone["vcr/accuracy"])
    assert joint["q2ar/accuracy"] <= min(joint["q2a/accuracy"], joint["qa2r/accuracy"]) + 1e-12
    assert joint["q2ar/accuracy"] >= joint["q2a/accuracy"] + joint["qa2r/accuracy"] - 1 - 1e-12

    missing = CliRunner().invoke(app, [
        "eval-vcr-joint", "--answer-recipe", str(recipes["q2a"]), "--answer-checkpoint", str(tmp_path / "nope"),
        "--rationale-recipe", str(recipes["qa2r"]), "--rationale-checkpoint", str(checkpoints["qa2r"]), *options,
    ])
    assert missing.exit_code == 2 and "nope" in missing.output
