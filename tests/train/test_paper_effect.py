"""VL-BERT's central effect on the demo data, measured on the held-out split with fixed seeds:
masked words that need the image are predicted better with the image than with it blanked, and
masked regions are classified better with the caption than without it."""

import pytest

from vlblocks.app.run import build_run
from vlblocks.train.evaluate import evaluate_with_ablations

pytestmark = pytest.mark.slow  # the demo recipe as it ships, 400 steps

# Margins are well under what this configuration measured (see docs/training.md), so the test
# fails only if the image or the caption stops helping.
SHAPE_WORD_MARGIN = 0.15
REGION_MARGIN = 0.25


def test_image_helps_masked_words_and_caption_helps_masked_regions(demo_recipe, full_demo_directory, tmp_path_factory):
    bindings = [f"DemoScenes.directory = '{full_demo_directory}'"]  # the demo recipe as it ships: 400 steps
    task, data, trainer = build_run(demo_recipe, bindings)
    trainer.fit(task, data, tmp_path_factory.mktemp("effect_run"), echo=lambda *_: None)
    results = evaluate_with_ablations(task, data, batch_size=64, max_batches=4, seed=0)
    full, blanked, no_caption = results["full"], results["image_blanked"], results["caption_dropped"]
    print({variant: {k: round(v, 3) for k, v in r.items() if k.endswith("accuracy")} for variant, r in results.items()})
    assert full["mlm_shape/count"] >= 50 and full["mvrc/count"] >= 30
    assert full["mlm_shape/accuracy"] >= blanked["mlm_shape/accuracy"] + SHAPE_WORD_MARGIN
    assert full["mvrc/accuracy"] >= no_caption["mvrc/accuracy"] + REGION_MARGIN
