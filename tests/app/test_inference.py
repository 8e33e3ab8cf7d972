"""Export, `vlblocks.load` and the predictors, on tiny demo-trained models."""

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from vlblocks.app.export import export_model
from vlblocks.app.inference import InferenceError, grid_boxes, load
from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.cli.app import app
from vlblocks.data.datasets.refcoco import load_coco_image
from vlblocks.train.checkpoint import CheckpointError, load_checkpoint

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
DEMO = {task: os.path.join(RECIPES, "demo", f"finetune_{task}.gin") for task in ("vqa", "vcr", "refcoco")}
SIZES = {"vqa": (96, 32), "vcr": (96, 32), "refcoco": (800, 200)}  # as tests/conftest.py writes them


def bindings(task, demo_tasks):
    train, val = SIZES[task]
    return [
        "NUM_LAYERS = 1", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "FlattenRoIHead.out_channels = 32",
        f"DemoScenes.directory = '{demo_tasks[task].root.parent.parent}'", f"DemoScenes.train = {train}", f"DemoScenes.val = {val}",
        "demo/Trainer.total_steps = 3", "demo/Trainer.batch_size = 4", "demo/Trainer.warmup_steps = 1", "demo/Trainer.eval_batches = 1",
        "demo/Trainer.lr_per_sample = 1e-4", f"APPEARANCE_SIZE = {48 if task == 'vqa' else 32}",
    ]


@pytest.fixture(scope="module")
def trained(demo_tasks, tmp_path_factory):
    """task -> (recipe, bindings, checkpoint) of a 3-step demo fine-tuning run."""
    runs = {}
    for task in ("vqa", "vcr", "refcoco"):
        out = tmp_path_factory.mktemp(f"run_{task}")
        train_from_recipe(DEMO[task], bindings(task, demo_tasks), out, echo=lambda *_: None, device="cpu")
        runs[task] = (DEMO[task], bindings(task, demo_tasks), out / "checkpoints" / "step-0000003")
    return runs


def evaluation_outputs(task, recipe, binds, checkpoint, items):
    """The evaluation path: the run's validation samples, collated as evaluation does, through the task."""
    model, data, _ = build_run(recipe, binds, echo=lambda *_: None)
    load_checkpoint(model, checkpoint)
    model.eval()
    with torch.no_grad():
        return model(data.collate([data.val[i] for i in items])).model_output, data


def exported_copy(trained, task, tmp_path, monkeypatch):
    """Export, copy the folder elsewhere, delete the original, work from a third folder."""
    recipe, binds, checkpoint = trained[task]
    export_model(checkpoint, recipe, tmp_path / "export", binds, echo=lambda *_: None)
    shutil.copytree(tmp_path / "export", tmp_path / "moved" / "model")
    shutil.rmtree(tmp_path / "export")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "moved" / "model"


def test_exported_vqa_folder_rebuilds_alone_and_answers_as_evaluation_does(trained, tmp_path, monkeypatch):
    recipe, binds, checkpoint = trained["vqa"]
    logits, data = evaluation_outputs("vqa", recipe, binds, checkpoint, [0, 1, 2])
    folder = exported_copy(trained, "vqa", tmp_path, monkeypatch)
    assert sorted(p.name for p in folder.iterdir()) == ["answers.json", "bert", "model.safetensors", "preprocessing.json", "recipe.gin", "vocab.txt"]
    assert "include" not in (folder / "recipe.gin").read_text()
    assert json.loads((folder / "answers.json").read_text()) == list(data.answers)

    model = load(folder)
    with torch.no_grad():
        rebuilt = model.task(data.collate([data.val[i] for i in [0, 1, 2]])).model_output
    assert torch.equal(rebuilt, logits)

    question = data.val.reader[1]
    answers = model.answer(question=question.question, features=data.val.features(question.image_id), top_k=3)
    assert [type(a["answer"]) for a in answers] == [str] * 3 and all(0.0 < a["score"] < 1.0 for a in answers)
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    assert answers[0]["answer"] == data.answers[int(logits[1].argmax())]
    assert answers[0]["score"] == pytest.approx(float(logits[1].max().sigmoid()), abs=1e-5)

    with pytest.raises(InferenceError, match="ships no detector"):
        model.answer(question="what color is the circle ?")


def test_grounding_picks_the_box_evaluation_picks(trained, demo_tasks, tmp_path, monkeypatch):
    recipe, binds, checkpoint = trained["refcoco"]
    scores, data = evaluation_outputs("refcoco", recipe, binds, checkpoint, [0])
    folder = exported_copy(trained, "refcoco", tmp_path, monkeypatch)
    model = load(folder)
    expression = data.val.reader[0]
    picture = load_coco_image(expression, data.val.image_root)
    found = model.ground(picture, " ".join(expression.tokens), boxes=expression.candidate_boxes)
    expected = scores[0].sigmoid()
    assert found["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    best = int(expected.argmax())
    assert found["box_index"] == (None if best == 0 else best - 1)
    assert len(found["box"]) == 4 and 0.0 < found["score"] < 1.0

    assert len(model.ground(picture, "the red circle", boxes="grid")["scores"]) == 1 + 9  # whole image + 3 x 3
    with pytest.raises(InferenceError, match="ships no object detector"):
        model.ground(picture, "the red circle")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(InferenceError, match="cannot read image .*not_an_image.png"):
        model.ground(tmp_path / "not_an_image.png", "the red circle", boxes="grid")


def test_vcr_choose_gives_evaluation_probabilities(trained, tmp_path, monkeypatch):
    recipe, binds, checkpoint = trained["vcr"]
    logits, data = evaluation_outputs("vcr", recipe, binds, checkpoint, [0])
    model = load((recipe, checkpoint), bindings=binds)
    item = data.val.reader[0]
    metadata = item.load_metadata()
    chosen = model.choose(
        item.load_image(), item.question, item.answer_choices, boxes=metadata.boxes, objects=item.objects, polygons=metadata.polygons
    )
    assert chosen["probabilities"] == pytest.approx(logits[0].softmax(-1).tolist(), abs=1e-5)
    assert sum(chosen["probabilities"]) == pytest.approx(1.0) and chosen["choice"] == int(logits[0].argmax())
    plain = model.choose(item.load_image(), "what color is the shape ?", ["red", "green", "blue", "yellow"], boxes="grid")
    assert len(plain["probabilities"]) == 4


def test_a_checkpoint_of_another_architecture_is_refused(trained):
    with pytest.raises(CheckpointError, match="does not fit|another recipe"):
        load((trained["vqa"][0], trained["vcr"][2]), bindings=trained["vqa"][1])


def test_bert_export_loads_into_transformers_without_missing_keys(trained, tmp_path):
    from transformers import BertModel

    recipe, binds, checkpoint = trained["vcr"]  # the VCR model has a pooler, as BertModel by default
    export_model(checkpoint, recipe, tmp_path / "export", binds, echo=lambda *_: None)
    bert, info = BertModel.from_pretrained(tmp_path / "export" / "bert", output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()) and not info["mismatched_keys"]
    ours = load(tmp_path / "export").task.vlbert
    assert torch.equal(bert.embeddings.word_embeddings.weight, ours.embedding.word_embeddings.weight)
    assert torch.equal(bert.encoder.layer[0].attention.self.query.weight, ours.encoder.layer[0].attention.self.query.weight)

    # Text only, without VL-BERT's visual terms and [END]: BERT's embedding sum → encoder → pooler.
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    segments = torch.tensor([[0, 0, 0, 1, 1]])
    bert.eval()
    with torch.no_grad():
        theirs = bert(input_ids=ids, token_type_ids=segments)
        embedding = ours.embedding
        summed = embedding.word_embeddings(ids) + embedding.position_embeddings(torch.arange(5)[None]) + embedding.token_type_embeddings(segments)
        states = ours.encoder(embedding.LayerNorm(summed), torch.ones(1, 5, dtype=torch.bool)).last_hidden_state
        pooled = ours.pooler(states)
    assert torch.allclose(theirs.last_hidden_state, states, atol=1e-5)
    assert torch.allclose(theirs.pooler_output, pooled, atol=1e-5)


def test_cli_export_writes_once_and_refuses_a_full_folder(trained, tmp_path):
    recipe, binds, checkpoint = trained["refcoco"]
    options = [item for bind in binds for item in ("--bind", bind)]
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(checkpoint), "--recipe", recipe, "--out", str(tmp_path / "out"), *options])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "bert" / "config.json").is_file() and not (tmp_path / "out" / "answers.json").exists()
    again = runner.invoke(app, ["export", str(checkpoint), "--recipe", recipe, "--out", str(tmp_path / "out"), *options])
    assert again.exit_code == 2 and "already exists" in again.output
    foreign = runner.invoke(app, ["export", str(trained["vcr"][2]), "--recipe", recipe, "--out", str(tmp_path / "foreign"), *options])
    assert foreign.exit_code == 2 and "model.safetensors" in foreign.output and not (tmp_path / "foreign").exists()
    assert not (tmp_path / ".foreign.partial").exists()


def test_grid_boxes_tile_the_image():
    # 90 x 60 in 3 x 3: columns at 0, 30, 60, 90 and rows at 0, 20, 40, 60, inclusive ends.
    boxes = grid_boxes(90, 60)
    assert boxes[0].tolist() == [0.0, 0.0, 29.0, 19.0]
    assert boxes[4].tolist() == [30.0, 20.0, 59.0, 39.0]
    assert boxes[8].tolist() == [60.0, 40.0, 89.0, 59.0]


def test_a_folder_without_export_files_names_the_missing_file(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(InferenceError, match="recipe.gin: missing"):
        load(tmp_path / "half")
