"""The paper's ablations (Table 4) are recipes that include the base recipe and change bindings only."""

import os
from pathlib import Path

import gin
import pytest

from vlblocks.app.recipes import parse_recipe
from vlblocks.app.registry import configured
from vlblocks.blocks import EndToEndRegionFeatures, PrecomputedRegionFeatures

RECIPES = Path(os.path.dirname(__file__), "..", "..", "recipes")
# Small sizes over the BASE recipes, so each task builds in a moment (the bindings under test are unchanged).
SMALL = ["HIDDEN_SIZE = 32", "NUM_LAYERS = 1", "NUM_HEADS = 2", "INTERMEDIATE_SIZE = 64", "VOCAB_SIZE = 100", "ResNetC4Backbone.depth = 50"]


def build_task(recipe: str):
    parse_recipe(RECIPES / recipe, SMALL)
    return configured("PretrainingTask")()


def objective_names(task) -> list[str]:
    return list(task.objectives)


def test_every_ablation_includes_a_base_recipe_and_only_binds():
    for path in sorted((RECIPES / "ablations").glob("*.gin")):
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        lines = [line for line in lines if line]
        assert lines[0].startswith("include '"), path
        assert all(line.startswith(("include '", "]")) or "=" in line or line.startswith("@") for line in lines), path


def test_base_pretraining_objectives():
    task = build_task("vlbert_base.gin")
    assert objective_names(task) == ["mlm", "mvrc", "mlm_text"]
    assert task.model.region_head is not None and task.model.relation_head is None


@pytest.mark.parametrize(
    "recipe, objectives",
    [
        ("ablations/without_mvrc.gin", ["mlm", "mlm_text"]),
        ("ablations/without_text_only.gin", ["mlm", "mvrc"]),
        ("ablations/with_relation.gin", ["relation", "mlm", "mvrc", "mlm_text"]),
        ("ablations/without_tuning_fast_rcnn.gin", ["mlm", "mvrc", "mlm_text"]),
        ("ablations/precomputed_features.gin", ["mlm", "mvrc", "mlm_text"]),
    ],
)
def test_pretraining_ablations_change_what_the_paper_changes(recipe, objectives):
    base = {name: tuple(p.shape) for name, p in build_task("vlbert_base.gin").named_parameters()}
    task = build_task(recipe)
    assert objective_names(task) == objectives
    assert task.reads_text_only == ("mlm_text" in objectives)
    shapes = {name: tuple(p.shape) for name, p in task.named_parameters()}
    apart = ("model.vlbert.region_features.", "model.vlbert.visual_embedding.", "model.vlbert.pooler.")

    def core(parameters):
        return {n: s for n, s in parameters.items() if n.startswith("model.vlbert.") and not n.startswith(apart)}

    assert core(shapes) == core(base), "the embedding and Transformer are the base recipe's"
    features = task.model.vlbert.region_features
    if recipe.endswith("without_mvrc.gin"):
        assert task.model.region_head is None
    if recipe.endswith("with_relation.gin"):
        assert task.model.relation_head is not None and task.model.vlbert.pooler is not None
    if recipe.endswith("without_tuning_fast_rcnn.gin"):
        assert isinstance(features, EndToEndRegionFeatures)
        assert not any(p.requires_grad for p in features.parameters()), "the detector is not tuned"
        assert any(p.requires_grad for p in build_task("vlbert_base.gin").model.vlbert.region_features.parameters())
    elif recipe.endswith("precomputed_features.gin"):
        assert isinstance(features, PrecomputedRegionFeatures) and features.out_features == 2048
        assert tuple(task.objectives["mvrc"].mask_feature.shape) == (1, 2048)
    else:
        assert isinstance(features, EndToEndRegionFeatures)


def test_no_pretraining_fine_tunes_from_bert_alone():
    parse_recipe(RECIPES / "ablations" / "no_pretraining.gin")
    assert gin.query_parameter("experiment.pretrained") is None
    assert gin.query_parameter("build_model.bert_directory").endswith("bert-base-uncased")
    parse_recipe(RECIPES / "finetune" / "vqa_base.gin")
    assert gin.query_parameter("experiment.pretrained") is not None
