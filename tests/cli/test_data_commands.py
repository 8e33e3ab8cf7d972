import base64
import json

import numpy as np
from typer.testing import CliRunner

from vlblocks.cli.app import app
from vlblocks.data.demo.scenes import write_demo_dataset
from vlblocks.data.formats.feature_store import FeatureStore


def b64(array):
    return base64.b64encode(np.asarray(array, np.float32).tobytes()).decode("ascii")


def test_validate_reports_each_bad_record_and_exits_non_zero(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo", train=20, val=5, seed=0)
    runner = CliRunner()
    clean = runner.invoke(app, ["data", "validate", str(paths.train), "--format", "cc"])
    assert clean.exit_code == 0, clean.output
    assert "20 records read, 0 with problems" in clean.output

    lines = paths.train.read_text().splitlines()
    record = json.loads(lines[3])
    record["caption"] = []
    lines[3] = json.dumps(record)
    record = json.loads(lines[7])
    record["image"] = "train_image.zip@/missing.png"
    lines[7] = json.dumps(record)
    paths.train.write_text("\n".join(lines) + "\n")
    broken = runner.invoke(app, ["data", "validate", str(paths.train), "--format", "cc"])
    assert broken.exit_code == 1
    assert "line 4" in broken.output and "caption" in broken.output
    assert "missing.png" in broken.output
    assert "20 records read, 2 with problems" in broken.output


def test_pack_per_image_json_features_into_a_store(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    for image_id in range(3):
        boxes = [[0, 0, 10, 10], [2, 2, 8, 9]]
        record = {"image_id": image_id, "image_w": 20, "image_h": 20, "num_boxes": 2, "boxes": b64(boxes), "features": b64(np.full((2, 8), image_id))}
        (folder / f"{image_id}.json").write_text(json.dumps(record))
    runner = CliRunner()
    assert runner.invoke(app, ["data", "validate", str(folder), "--format", "feature-json"]).exit_code == 0
    result = runner.invoke(app, ["data", "pack", str(folder), str(tmp_path / "store"), "--format", "feature-json"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "store")
    assert len(store) == 3 and np.all(store["2"].features == 2.0)

    (folder / "1.json").write_text("{not json")
    failed = runner.invoke(app, ["data", "pack", str(folder), str(tmp_path / "store2"), "--format", "feature-json"])
    assert failed.exit_code == 2 and "1.json" in failed.output
    assert not (tmp_path / "store2" / "index.json").exists()


def test_validate_vqa_names_the_question_and_field(tmp_path):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
                 "questions": [{"image_id": 1, "question": "What colour is it?", "question_id": 10},
                               {"image_id": 2, "question": "How many?", "question_id": 20}]}
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"question_type": "what color", "multiple_choice_answer": "red", "answers": answers, "image_id": 1, "answer_type": "other", "question_id": 10},
        {"question_type": "how many", "multiple_choice_answer": "2", "answers": answers, "image_id": 2, "answer_type": "colour", "question_id": 20},
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "q.json"), "--format", "vqa", "--annotations", str(tmp_path / "a.json")])
    assert result.exit_code == 1
    assert "question_id 20" in result.output and "answer_type" in result.output
    assert "2 records read, 1 with problems" in result.output
