"""The VQA recipes flip training samples as VL-BERT's cfgs/vqa/*.yaml do (TRAIN.FLIP_PROB: 0.5)."""

import os

import gin
import pytest

from vlblocks.app.recipes import parse_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


@pytest.mark.parametrize("recipe", ["finetune/vqa_base.gin", "demo/finetune_vqa.gin"])
def test_vqa_recipes_flip_half_the_training_samples_and_match_raw_answers(recipe):
    parse_recipe(os.path.join(RECIPES, recipe))
    assert gin.query_parameter("vqa_data.flip_probability") == 0.5
    assert gin.query_parameter("vqa_data.normalize_answers") is False
