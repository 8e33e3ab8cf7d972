"""`vlblocks predict` end to end on tiny demo-trained checkpoints: the VQA json, the RefCOCO+
json with its accuracy, and the VCR leaderboard csv of an unlabelled test split (and of val,
with the joint accuracy `eval-vcr-joint` reports)."""

import csv
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from vlblocks.app.predict import predict_from_recipe
from vlblocks.app.run import train_from_recipe
from vlblocks.app.vcr_joint import vcr_joint_from_recipes
from vlblocks.cli.app import app

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo")
SIZES = {"vqa": (96, 32), "vcr": (96, 32), "refcoco": (800, 200)}  # as tests/conftest.py writes them
TINY = ["NUM_LAYERS = 1", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "FlattenRoIHead.out_channels = 32"]


def bindings(task, demo_tasks):
    train, val = SIZES[task]
    return [
        *TINY, f"DemoScenes.directory = '{demo_tasks[task].root.parent.parent}'", f"DemoScenes.train = {train}", f"DemoScenes.val = {val}",
        "demo/Trainer.total_steps = 1", "demo/Trainer.batch_size = 4", "demo/Trainer.warmup_steps = 1", "demo/Trainer.eval_batches = 1",
        "APPEARANCE_SIZE = 48" if task == "vqa" else "APPEARANCE_SIZE = 32",
    ]


def trained(recipe, binds, out):
    train_from_recipe(recipe, binds, out, echo=lambda *_: None, device="cpu")
    return out / "checkpoints" / "step-0000001"


def predict(recipe, checkpoint, split, out, binds, *extra):
    options = [item for bind in binds for item in ("--bind", bind)]
    command = ["predict", str(recipe), "--checkpoint", str(checkpoint), "--split", split, "--out", str(out), "--device", "cpu", *options, *extra]
    return CliRunner().invoke(app, command)


def test_vqa_predictions_for_a_test_split_without_annotations(demo_tasks, tmp_path):
    recipe, binds = os.path.join(RECIPES, "finetune_vqa.gin"), bindings("vqa", demo_tasks)
    checkpoint = trained(recipe, binds, tmp_path / "run")
    vqa = demo_tasks["vqa"].root / "vqa"
    questions = json.loads((vqa / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    # test-dev in the public layout: the questions file only, no annotations.
    (vqa / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({**questions, "data_subtype": "test-dev2015"}))
    result = predict(recipe, checkpoint, "test-dev2015", tmp_path / "vqa.json", binds)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "vqa.json").read_text())
    answers = (vqa / "answers_vqa.txt").read_text().split("\n")
    assert [entry["question_id"] for entry in written] == [q["question_id"] for q in questions["questions"]]
    assert all(list(entry) == ["question_id", "answer"] and entry["answer"] in answers for entry in written)

    missing = predict(recipe, checkpoint, "test2015", tmp_path / "none.json", binds)
    assert missing.exit_code == 2 and "test2015_questions.json" in missing.output
    assert not (tmp_path / "none.json").exists()


def test_refcoco_predictions_are_boxes_of_the_original_image_with_their_accuracy(demo_tasks, tmp_path):
    recipe, binds = os.path.join(RECIPES, "finetune_refcoco.gin"), bindings("refcoco", demo_tasks)
    checkpoint = trained(recipe, binds, tmp_path / "run")
    result = predict(recipe, checkpoint, "val", tmp_path / "refcoco.json", binds, "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert "refcoco/accuracy" in result.output
    written = json.loads((tmp_path / "refcoco.json").read_text())
    assert len(written) == 200 and all(list(entry) == ["ref_id", "box"] and len(entry["box"]) == 4 for entry in written)
    # Each picked box is a region of its image: the whole image or one of its shapes, in original pixels.
    instances = json.loads((demo_tasks["refcoco"].root / "refcoco+" / "instances.json").read_text())
    images = {image["id"]: image for image in instances["images"]}
    ordered = sorted(images)[-200:]  # the val images follow the 800 training images, one ref each
    for entry, image_id in zip(written, ordered):
        image = images[image_id]
        regions = [[0.0, 0.0, image["width"] - 1.0, image["height"] - 1.0]] + [
            [x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in instances["annotations"] if a["image_id"] == image_id)
        ]
        assert np.min(np.abs(np.asarray(regions) - np.asarray(entry["box"])).max(1)) < 1e-3, (entry, regions)


def test_vcr_leaderboard_csv_for_test_and_joint_accuracy_on_val(demo_tasks, tmp_path):
    binds = bindings("vcr", demo_tasks)
    recipes, checkpoints = {}, {}
    for mode in ("q2a", "qa2r"):
        recipes[mode] = tmp_path / f"vcr_{mode}.gin"
        recipes[mode].write_text(f"include '{os.path.abspath(os.path.join(RECIPES, 'finetune_vcr.gin'))}'\nvcr_data.task = '{mode}'\n")
        checkpoints[mode] = trained(recipes[mode], binds, tmp_path / mode)
    root = demo_tasks["vcr"].root
    lines = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()]
    unlabelled = [{k: v for k, v in line.items() if k not in ("answer_label", "rationale_label")} for line in lines]
    (root / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in unlabelled))
    rationale = ["--rationale-recipe", str(recipes["qa2r"]), "--rationale-checkpoint", str(checkpoints["qa2r"]), "--batch-size", "8"]

    result = predict(recipes["q2a"], checkpoints["q2a"], "test", tmp_path / "test.csv", binds, *rationale)
    assert result.exit_code == 0, result.output
    assert "accuracy" not in result.output
    with open(tmp_path / "test.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3", "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3" and len(rows[0]) == 21
    assert [row[0] for row in rows[1:]] == [line["annot_id"] for line in lines]
    probabilities = np.asarray([[float(value) for value in row[1:]] for row in rows[1:]]).reshape(len(lines), 5, 4)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)  # a softmax per answer and per conditioned rationale set

    metrics = predict_from_recipe(
        recipes["q2a"], checkpoints["q2a"], "val", tmp_path / "val.csv", binds, 8, "cpu", lambda *_: None, recipes["qa2r"], checkpoints["qa2r"]
    )
    joint = vcr_joint_from_recipes(recipes["q2a"], checkpoints["q2a"], recipes["qa2r"], checkpoints["qa2r"], binds, 8, lambda *_: None, "cpu")
    assert set(metrics) == {"q2a/accuracy", "qa2r/accuracy", "q2ar/accuracy", "count"} and metrics == pytest.approx(joint)

    alone = predict(recipes["q2a"], checkpoints["q2a"], "val", tmp_path / "alone.csv", binds)
    assert alone.exit_code == 2 and "--rationale-recipe" in alone.output and not (tmp_path / "alone.csv").exists()
