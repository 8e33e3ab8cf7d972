"""`vlblocks convert hf` and `vlblocks convert to-hf` on a tiny VisualBERT (recipes/variants/visualbert.gin
with tiny sizes), against folders written by transformers itself."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import VisualBertConfig, VisualBertForPreTraining, VisualBertModel
from typer.testing import CliRunner

from vlblocks.app.convert_hf import convert_hf, export_hf
from vlblocks.cli.app import app
from vlblocks.train.checkpoint import CheckpointError

TINY = """include 'variants/visualbert.gin'
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 64
VOCAB_SIZE = 50
MAX_POSITIONS = 64
APPEARANCE_SIZE = 12
"""
CORE_ONLY = ["VLBertForPretraining.mlm_head = None", "VLBertForPretraining.relation_head = None", "PretrainingTask.objectives = []"]


def tiny_config():
    return VisualBertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        visual_embedding_dim=12, max_position_embeddings=64,
    )


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "visualbert_tiny.gin"
    path.write_text(TINY)
    return path


@pytest.fixture
def hf_folder(tmp_path, randomised):
    folder = tmp_path / "hf"
    model = randomised(VisualBertForPreTraining(tiny_config()))
    model.save_pretrained(folder)
    return folder, model


def hf_inputs():
    generator = torch.Generator().manual_seed(1)
    text_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    region_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return dict(
        input_ids=torch.randint(2, 50, (2, 5), generator=generator) * text_mask,
        attention_mask=text_mask,
        token_type_ids=torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
        visual_embeds=torch.randn(2, 3, 12, generator=generator) * region_mask[..., None],
        visual_attention_mask=region_mask,
        output_hidden_states=True,
        output_attentions=True,
    )


def test_convert_hf_then_to_hf_gives_back_the_transformers_model(tmp_path, recipe, hf_folder):
    folder, reference = hf_folder
    runner = CliRunner()
    checkpoint = tmp_path / "visualbert.safetensors"
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert f"wrote {checkpoint}" in result.output
    with safe_open(str(checkpoint), "pt") as handle:
        metadata = handle.metadata()
        assert "model.vlbert.embedding.visual_position_embeddings.weight" in handle.keys()
    assert metadata["step"] == "0" and metadata["converted_from"] == str(folder) and "VLEmbedding.layout = 'concatenated'" in metadata["recipe"]

    exported = tmp_path / "exported"
    result = runner.invoke(app, ["convert", "to-hf", str(checkpoint), "--recipe", str(recipe), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert "as VisualBertForPreTraining" in result.output
    assert not list(tmp_path.glob(".*partial*"))
    loaded, info = VisualBertForPreTraining.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["VisualBertForPreTraining"] and config["model_type"] == "visual_bert"
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    loaded.eval()
    with torch.no_grad():
        theirs, ours = reference(**hf_inputs()), loaded(**hf_inputs())
    for name in ("prediction_logits", "seq_relationship_logits"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for mine, reference_tensor in (*zip(ours.hidden_states, theirs.hidden_states), *zip(ours.attentions, theirs.attentions)):
        assert torch.equal(mine, reference_tensor)

    # The output folder must be new or empty: nothing is overwritten.
    result = runner.invoke(app, ["convert", "to-hf", str(checkpoint), "--recipe", str(recipe), "--out", str(exported)])
    assert result.exit_code == 2 and "already exists and is not an empty folder" in result.output


def test_a_visual_bert_model_converts_into_a_recipe_without_heads(tmp_path, recipe, randomised):
    folder = tmp_path / "core"
    randomised(VisualBertModel(tiny_config()), seed=2).save_pretrained(folder)
    out = tmp_path / "core.safetensors"
    written = convert_hf(folder, recipe, out, CORE_ONLY, echo=lambda line: None)
    with safe_open(str(written), "pt") as handle:
        assert not any("head" in key for key in handle.keys())
    # With the heads in the recipe, the missing heads are named with the fix.
    with pytest.raises(CheckpointError, match=r"no tensor for model.mlm_head.bias.*VLBertForPretraining.mlm_head = None"):
        convert_hf(folder, recipe, tmp_path / "heads.safetensors", echo=lambda line: None)
    assert not (tmp_path / "heads.safetensors").exists()


def test_errors_print_one_line_and_exit_non_zero(tmp_path, recipe, hf_folder):
    folder, _ = hf_folder
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    # Another size than the recipe's: named by its config field.
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(out), "--bind", "NUM_HEADS = 2"])
    assert result.exit_code == 2 and "num_attention_heads 4 (the recipe's model: 2)" in result.output
    # A model vlblocks' VisualBERT does not compute.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bypass_transformer": True}))
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 2 and "bypass_transformer=True" in result.output
    # A model type without a converter.
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 2 and "model_type 'bert' has no converter" in result.output
    # A recipe whose model computes something else than VisualBERT.
    (folder / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(out), "--bind", "VLEmbedding.region_segment = 0"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {recipe}: the model is not VisualBERT-shaped: VLEmbedding.region_segment is 0; VisualBERT's is 1"]
    assert not out.exists()
    # A checkpoint that does not fit the recipe cannot be exported.
    result = runner.invoke(app, ["convert", "to-hf", str(tmp_path / "missing.safetensors"), "--recipe", str(recipe), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such checkpoint" in result.output


def test_export_refuses_a_model_transformers_has_no_class_for(tmp_path, recipe):
    from vlblocks.app.recipes import build_from_recipe, parse_recipe
    from vlblocks.app.registry import experiment
    from vlblocks.train.checkpoint import save_checkpoint

    bindings = ["VisualFeatureEmbedding.dropout = 0.1"]
    parse_recipe(recipe, bindings)
    task = build_from_recipe(recipe, build_from_recipe(recipe, experiment)[0])
    folder = save_checkpoint(task, tmp_path / "run", 0, "")
    with pytest.raises(CheckpointError, match=r"not VisualBERT-shaped: VLBert.visual_embedding must be VisualFeatureEmbedding\(geometry=None"):
        export_hf(folder, recipe, tmp_path / "exported", bindings, echo=lambda line: None)
    assert not (tmp_path / "exported").exists()


def test_lxmert_goes_through_both_commands_with_its_objectives_left_as_initialised(tmp_path, randomised):
    """An `LxmertForPreTraining` folder → `convert hf` into recipes/variants/lxmert.gin (whose
    objectives hold a learned mask feature no HF folder has, listed as left out) → `convert to-hf`
    → `from_pretrained` with no missing or unexpected keys and every tensor equal."""
    from transformers import LxmertConfig, LxmertForPreTraining

    config = LxmertConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=48, l_layers=1, r_layers=1, x_layers=1,
        visual_feat_dim=12, num_object_labels=7, num_attr_labels=5, max_position_embeddings=24, task_qa=False,
    )
    reference = randomised(LxmertForPreTraining(config))
    folder = tmp_path / "lxmert-hf"
    reference.save_pretrained(folder)
    recipe = tmp_path / "lxmert_tiny.gin"
    recipe.write_text(
        "include 'variants/lxmert.gin'\nHIDDEN_SIZE = 32\nTEXT_LAYERS = 1\nREGION_LAYERS = 1\nCROSS_LAYERS = 1\nNUM_HEADS = 4\n"
        "INTERMEDIATE_SIZE = 48\nVOCAB_SIZE = 50\nMAX_POSITIONS = 24\nAPPEARANCE_SIZE = 12\nNUM_OBJECT_LABELS = 7\nNUM_ATTRIBUTE_LABELS = 5\n"
    )
    runner = CliRunner()
    checkpoint = tmp_path / "lxmert.safetensors"
    result = runner.invoke(app, ["convert", "hf", str(folder), "--recipe", str(recipe), "--out", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "objectives.region_masking.mask_feature" in result.output
    out = tmp_path / "lxmert-back"
    result = runner.invoke(app, ["convert", "to-hf", str(checkpoint), "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    back, info = LxmertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = reference.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
