import os

from typer.testing import CliRunner

from vlblocks.app.describe import ExampleShape, count_multiply_adds, example_batch
from vlblocks.app.recipes import model_from_recipe
from vlblocks.cli.app import app

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")


def test_describe_prints_tree_parameters_and_multiply_adds():
    result = CliRunner().invoke(app, [
        "describe", TINY, "--image-size", "32x48", "--text-length", "10", "--regions", "5", "--bind", "TransformerEncoder.num_layers = 3",
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("recipe: ") and "vlbert_tiny.gin (includes " in lines[0] and lines[0].endswith("models/vlbert.gin)")
    lines = lines[1:]
    assert lines[0].split() == ["module", "parameters", "multiply-adds", "(MACs)"]
    assert "flop" not in lines[0].lower()
    # A layer of the tiny encoder (hidden 64, feed-forward 128), indented two spaces per level below
    # vlbert > encoder; the ModuleList 'layer' is folded into its children's names.
    # Parameters: query, key, value, attention output 4 x (64*64 + 64) = 16,640; feed-forward
    # 64*128 + 128 + 128*64 + 64 = 16,576; two LayerNorms 2 x 128 = 256; total 33,472.
    # Multiply-adds on 10 + 5 + 1 = 16 tokens: 567,296 (see the formula test below) -> '567.30 K'.
    layer = next(line for line in lines if line.lstrip().startswith("layer.2 "))
    assert layer.startswith("    layer.2 (TransformerLayer)") and layer.split()[-3:] == ["33,472", "567.30", "K"]
    assert any(line.startswith("  encoder (TransformerEncoder)") for line in lines)
    # The total row counts the tied MLM decoder weight once: it shows 0 parameters of its own.
    total = next(line for line in lines if line.startswith("total (VLBertForPretraining)"))
    decoder = next(line for line in lines if line.strip().startswith("decoder (Linear)"))
    assert decoder.split()[2] == "0" and "mlm_head.decoder.weight is tied to vlbert.embedding.word_embeddings.weight" in result.output
    parameters = int(next(line for line in lines if line.startswith("parameters:")).split()[1].replace(",", ""))
    assert total.split()[2] == f"{parameters:,}"
    assert "multiply-adds (MACs) per sample:" in result.output and "2 FLOPs per multiply-add" in result.output


def test_format_count_names_units_and_uncalled_modules():
    from vlblocks.app.describe import format_count

    assert [format_count(n) for n in (None, 0, 999, 1000, 567_296, 598_630_000, 2.5e12)] == [
        "-", "0", "999", "1.00 K", "567.30 K", "598.63 M", "2.50 T",
    ]


def test_shown_modules_fold_module_lists_and_stop_at_the_depth():
    from torch import nn

    from vlblocks.app.describe import shown_modules

    model = nn.Sequential()
    model.add_module("encoder", nn.Module())
    model.encoder.layer = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)])
    model.add_module("head", nn.Linear(2, 1))
    assert shown_modules(model, max_depth=2) == [
        ("encoder", 1, "encoder"), ("encoder.layer.0", 2, "layer.0"), ("encoder.layer.1", 2, "layer.1"), ("head", 1, "head"),
    ]
    assert [row[0] for row in shown_modules(model, max_depth=3)][2] == "encoder.layer.0.0"


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


def test_describe_runs_on_a_fine_tuning_task_recipe():
    # A VQA task reads its answer from `answer_positions`: the example sample has to provide it.
    vqa = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", "finetune_vqa.gin")
    result = CliRunner().invoke(app, ["describe", vqa, "--depth", "1", "--text-length", "8", "--regions", "4", "--bind", "NUM_LAYERS = 1"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("total (VQATask)") for line in result.output.splitlines())
    assert any(line.startswith("head (AnswerHead)") for line in result.output.splitlines())


VARIANTS = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "variants")


def test_describe_prints_each_variant_tree_with_every_head_counted():
    small = ["HIDDEN_SIZE = 32", "NUM_HEADS = 2", "INTERMEDIATE_SIZE = 64", "VOCAB_SIZE = 100", "APPEARANCE_SIZE = 16"]
    visualbert = CliRunner().invoke(app, ["describe", os.path.join(VARIANTS, "visualbert.gin"), "--bind", "NUM_LAYERS = 1", *(a for b in small for a in ("--bind", b))])
    assert visualbert.exit_code == 0, visualbert.output
    assert "  embedding (VLEmbedding)" in visualbert.output and "\nrelation_head (RelationHead)" in visualbert.output
    lxmert_bindings = ["TEXT_LAYERS = 1", "REGION_LAYERS = 1", "CROSS_LAYERS = 1", "NUM_OBJECT_LABELS = 5", "NUM_ATTRIBUTE_LABELS = 3", *small]
    lxmert = CliRunner().invoke(app, ["describe", os.path.join(VARIANTS, "lxmert.gin"), *(a for b in lxmert_bindings for a in ("--bind", b))])
    assert lxmert.exit_code == 0, lxmert.output
    lines = lxmert.output.splitlines()
    assert any(line.startswith("  encoder (CoAttentionEncoder)") for line in lines)
    assert any(line.lstrip().startswith("cross_layer.0 (CrossModalityLayer)") for line in lines)
    head = next(line for line in lines if line.startswith("visual_head (RegionPredictionHead)"))
    assert head.split()[-2] != "-", "the dict-valued head is traced and counted"
    for result in (visualbert, lxmert):
        assert "multiply-adds (MACs) per sample:" in result.output and "parameters:" in result.output
