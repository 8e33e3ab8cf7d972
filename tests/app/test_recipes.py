"""Recipes build the paper's models; recipe errors name the file, line and a close match."""

import glob
import os

import gin
import pytest

from vlblocks.app.recipes import RecipeError, model_from_recipe, parse_recipe
from vlblocks.app.registry import REGISTERED, configured, registered_names
from vlblocks.app.run import DEMO_SCOPE
from vlblocks.models import VLBert, VLBertForPretraining

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def test_every_block_is_registered_under_its_class_name():
    names = registered_names()
    for cls in REGISTERED:
        assert cls.__name__ in names
    assert "num_layers" in names["TransformerEncoder"]


def test_base_recipe_builds_vlbert_base_dimensions():
    model = model_from_recipe(os.path.join(RECIPES, "models", "vlbert_base_prec.gin"))
    assert isinstance(model, VLBertForPretraining) and isinstance(model.vlbert, VLBert)
    encoder = model.vlbert.encoder
    assert len(encoder.layer) == 12
    assert encoder.layer[0].attention.self.num_heads == 12
    assert encoder.layer[0].intermediate.dense.weight.shape == (3072, 768)
    assert model.vlbert.embedding.token_type_embeddings.weight.shape == (3, 768)
    assert model.vlbert.visual_embedding.projection.weight.shape == (768, 4096)
    assert model.region_head.region_cls_pred.weight.shape == (1601, 768)
    assert model.vlbert.pooler is None and model.relation_head is None
    assert model.vlbert.embedding.visual_text.LayerNorm.weight.abs().sum() == 0


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("vlbert_base.gin", {"HIDDEN_SIZE": 768, "NUM_LAYERS": 12, "NUM_HEADS": 12, "INTERMEDIATE_SIZE": 3072}),
        ("vlbert_large.gin", {"HIDDEN_SIZE": 1024, "NUM_LAYERS": 24, "NUM_HEADS": 16, "INTERMEDIATE_SIZE": 4096}),
    ],
)
def test_model_definitions_bind_the_paper_sizes(recipe, expected):
    parse_recipe(os.path.join(RECIPES, "models", recipe))
    for macro, value in expected.items():
        assert gin.query_parameter(f"%{macro}") == value
    assert gin.query_parameter("ResNetC4Backbone.depth") == 101
    assert gin.query_parameter("EndToEndRegionFeatures.output_size") == 14
    assert gin.query_parameter("EndToEndRegionFeatures.sampling_ratio") == 1


def test_misspelt_configurable_names_file_line_and_close_match(tmp_path):
    recipe = tmp_path / "bad.gin"
    recipe.write_text("# a comment\nVLEmbeding.hidden_size = 64\n")
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    message = str(error.value)
    assert str(recipe) in message and "line 2" in message and "VLEmbeding.hidden_size" in message
    assert "Did you mean: VLEmbedding" in message


def test_misspelt_parameter_in_a_binding_lists_close_matches():
    with pytest.raises(RecipeError) as error:
        parse_recipe(os.path.join(RECIPES, "models", "vlbert_tiny.gin"), ["TransformerEncoder.num_layer = 3"])
    message = str(error.value)
    assert "bindings string line 1" in message and "Did you mean: num_layers" in message


def test_unknown_reference_and_broken_syntax(tmp_path):
    recipe = tmp_path / "ref.gin"
    recipe.write_text("build_model.model = @VLBertt()\n")
    with pytest.raises(RecipeError, match=r"(?s)line 1.*Did you mean: VLBert"):
        parse_recipe(recipe)
    broken = tmp_path / "broken.gin"
    broken.write_text("TransformerEncoder.num_layers = (1,\n")
    with pytest.raises(RecipeError, match="broken.gin"):
        parse_recipe(broken)
    with pytest.raises(RecipeError, match="recipe not found"):
        parse_recipe(tmp_path / "missing.gin")


def test_a_recipe_outside_the_checkout_can_include_ours(tmp_path):
    recipe = tmp_path / "mine.gin"
    recipe.write_text("include 'models/vlbert_tiny.gin'\nTransformerEncoder.num_layers = 3\n")
    assert len(model_from_recipe(recipe).vlbert.encoder.layer) == 3


def test_the_real_data_recipe_only_sets_paths_on_top_of_the_base_recipe():
    parse_recipe(os.path.join(RECIPES, "data", "conceptual_captions.gin"))
    assert gin.query_parameter("pretraining_data.train_annotations").endswith("train_frcnn.json")
    assert gin.query_parameter("build_model.bert_directory").endswith("bert-base-uncased")
    assert gin.query_parameter("Trainer.total_steps") == 258000


REAL_DATA_RECIPES = sorted(
    os.path.relpath(path, RECIPES)
    for pattern in ("vlbert_*.gin", "data/*.gin", "finetune/*.gin", "ablations/*.gin")
    for path in glob.glob(os.path.join(RECIPES, pattern))
)


def test_the_real_data_recipes_are_all_found():
    assert len(REAL_DATA_RECIPES) == 17 and "finetune/refcoco_plus_base_detected.gin" in REAL_DATA_RECIPES


@pytest.mark.parametrize("recipe", REAL_DATA_RECIPES)
def test_real_runs_never_see_the_demo_schedule(recipe):
    parse_recipe(os.path.join(RECIPES, recipe))
    real = configured("Trainer")()
    with gin.config_scope(DEMO_SCOPE):
        demo = configured("Trainer")()
    assert real.schedule.total_steps >= 8000 and real.log_every >= 50 and real.checkpoint_every >= 1000
    assert demo.schedule.total_steps <= 100 and demo.log_every <= 10 and demo.checkpoint_every == 0
    assert demo.lr_per_sample == real.lr_per_sample, "the demo keeps the rest of the recipe"
