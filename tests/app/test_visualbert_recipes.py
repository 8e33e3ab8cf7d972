"""recipes/variants/visualbert*.gin build the model transformers' VisualBertForPreTraining describes."""

from pathlib import Path

import torch
from transformers import VisualBertConfig, VisualBertForPreTraining

from vlblocks.app.recipes import build_from_recipe, model_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.interop.hf_visualbert import hf_config
from vlblocks.objectives import ImageTextMatching, MaskedLanguageModeling

VARIANTS = Path(__file__).resolve().parents[2] / "recipes" / "variants"


def quiet(line):
    """Where the builds' reports go."""


def test_the_base_recipe_is_visualbert_base_with_its_objectives():
    model = model_from_recipe(VARIANTS / "visualbert.gin", echo=quiet)
    config = hf_config(model)
    reference = VisualBertConfig(visual_embedding_dim=2048)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "visual_embedding_dim",
                 "hidden_dropout_prob", "attention_probs_dropout_prob"):
        assert getattr(config, name) == getattr(reference, name), name
    with torch.device("meta"):
        parameters = sum(p.numel() for p in VisualBertForPreTraining(reference).parameters())
    assert sum(p.numel() for p in model.parameters()) == parameters == 112_074_812
    parse_recipe(VARIANTS / "visualbert.gin", ["HIDDEN_SIZE = 32", "NUM_HEADS = 4", "INTERMEDIATE_SIZE = 64", "NUM_LAYERS = 1"])
    task = build_from_recipe(VARIANTS / "visualbert.gin", build_from_recipe(VARIANTS / "visualbert.gin", experiment, quiet)[0], quiet)
    itm, mlm = task.objectives.values()
    assert isinstance(itm, ImageTextMatching) and itm.matched_class == 0 and itm.probability == 0.5
    assert isinstance(mlm, MaskedLanguageModeling)


def test_the_demo_recipe_is_visualbert_shaped_but_end_to_end():
    model = model_from_recipe(VARIANTS / "visualbert_demo.gin", echo=quiet)
    assert type(model.vlbert.region_features).__name__ == "EndToEndRegionFeatures"
    embedding = model.vlbert.embedding
    assert embedding.layout == "concatenated" and embedding.separate_region_tables and embedding.region_segment == 1
    assert model.vlbert.visual_embedding.geometry is None and model.relation_head is not None
    assert embedding.hidden_size == 128 and len(model.vlbert.encoder.layer) == 4
