"""docs/variants.md's tutorial recipe, as written there, trains with `vlblocks train` and builds what it says."""

import json
import math
import re
from pathlib import Path

from typer.testing import CliRunner

from vlblocks.app.recipes import model_from_recipe
from vlblocks.blocks import AveragedRegionFeatureEmbedding
from vlblocks.cli.app import app

DOC = Path(__file__).parents[2] / "docs" / "variants.md"


def tutorial_recipe() -> str:
    match = re.search(r"<!-- file: my_variant.gin -->\n```gin\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/variants.md lost its tutorial recipe"
    return match.group(1)


def test_the_tutorial_variant_builds_and_trains(tmp_path):
    recipe = tmp_path / "my_variant.gin"
    recipe.write_text(tutorial_recipe())
    small = [
        f"DemoScenes.directory = '{tmp_path / 'demo'}'", "DemoScenes.train = 96", "DemoScenes.val = 32", "HIDDEN_SIZE = 32",
        "NUM_LAYERS = 1", "INTERMEDIATE_SIZE = 64", "FlattenRoIHead.out_channels = 32", "APPEARANCE_SIZE = 32",
        "demo/Trainer.total_steps = 4", "demo/Trainer.batch_size = 8", "demo/Trainer.text_batch_size = 4",
        "demo/Trainer.warmup_steps = 1", "demo/Trainer.log_every = 2", "demo/Trainer.eval_batches = 1",
    ]
    model = model_from_recipe(recipe, small)
    assert isinstance(model.vlbert.visual_embedding, AveragedRegionFeatureEmbedding)
    assert model.vlbert.embedding.visual_text is None and model.vlbert.embedding.visual_region is not None

    binds = [argument for binding in small for argument in ("--bind", binding)]
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"), *binds])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "split" not in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert any(r.get("split") == "val" for r in records)
