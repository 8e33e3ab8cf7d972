import os

from typer.testing import CliRunner

from vlblocks.app.describe import ExampleShape, count_multiply_adds, example_batch
from vlblocks.app.recipes import model_from_recipe
from vlblocks.cli.app import app

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")


def test_describe_prints_tree_parameters_and_flops():
    result = CliRunner().invoke(app, ["describe", TINY, "--image-size", "64x96", "--bind", "TransformerEncoder.num_layers = 3"])
    assert result.exit_code == 0, result.output
    assert "VLBertForPretraining" in result.output
    assert "vlbert.encoder.layer.2" in result.output
    assert "parameters:" in result.output and "multiply-adds per sample" in result.output


def test_describe_reports_recipe_errors_with_a_close_match():
    result = CliRunner().invoke(app, ["describe", TINY, "--bind", "TransformerEncodr.num_layers = 3"])
    assert result.exit_code == 2
    assert "Did you mean: TransformerEncoder" in result.output


def test_encoder_layer_multiply_adds_match_the_formula():
    model = model_from_recipe(TINY).eval()
    shape = ExampleShape(text_length=10, regions=5, image_height=32, image_width=48)
    analysis = count_multiply_adds(model, example_batch(model, shape))
    tokens, hidden, ffn = 10 + 5 + 1, 64, 128
    linear = tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = tokens * tokens * 2 * hidden  # QK^T and PV over all heads
    layer_norms = 2 * 5 * tokens * hidden  # fvcore counts 5 per element of a LayerNorm
    assert analysis.by_module()["model.vlbert.encoder.layer.0"] == linear + attention + layer_norms
