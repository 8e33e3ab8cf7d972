"""The `vlblocks` command line: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlblocks.app.allocator import restart_with_tuned_allocator

app = typer.Typer(help="vlblocks: composable blocks for visual-linguistic Transformers (VL-BERT).", no_args_is_help=True)

BIND_HELP = "A gin binding that overrides the recipe, e.g. --bind 'TransformerEncoder.num_layers = 6'. Repeatable."
DEVICE_HELP = "Where to compute: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."
PRECISION_HELP = "fp32, bf16 or fp16 autocast; default: the recipe's Trainer.precision (its fp16 becomes fp32 on a CPU)."


def _device_and_precision(device: str, precision: Optional[str]):
    """The resolved torch device and the checked precision name, or a usage error naming the flag."""
    from vlblocks.train.device import resolve_device
    from vlblocks.train.precision import PRECISIONS

    try:
        resolved = resolve_device(device)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None
    if precision is not None and precision not in PRECISIONS:
        raise typer.BadParameter(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", param_hint="--precision")
    return resolved, precision


def _print_version(value: bool) -> None:
    if value:
        from vlblocks import __version__

        typer.echo(f"vlblocks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """vlblocks: composable blocks for visual-linguistic Transformers (VL-BERT)."""


@app.command("recipes")
def recipes(
    names: bool = typer.Option(False, "--names", help="List every configurable a recipe may bind, with its parameters and defaults."),
    name: Optional[str] = typer.Argument(None, help="With --names: only this configurable (e.g. VLEmbedding)."),
) -> None:
    """List the bundled recipes (by name, with what each trains on what data), or with --names the
    configurables a recipe may bind."""
    from vlblocks.app.recipe_catalog import bundled_recipe_lines, configurable_lines

    try:
        lines = configurable_lines(name) if names else bundled_recipe_lines()
    except KeyError as error:
        typer.echo(f"error: {error.args[0]}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n".join(lines))


@app.command()
def describe(
    recipe: Path = typer.Argument(..., help="A gin recipe, e.g. recipes/models/vlbert_base.gin."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    text_length: int = typer.Option(32, help="Text tokens in the sample multiply-adds are counted on."),
    regions: int = typer.Option(36, help="Regions (whole image included) in that sample."),
    image_size: str = typer.Option("600x800", help="HEIGHTxWIDTH of that sample's image (end-to-end models)."),
    depth: int = typer.Option(3, help="How many levels of the module tree to show."),
) -> None:
    """Print the recipe's model as an indented module tree with parameters and multiply-adds
    (MACs) per sample for each module, and a total row."""
    from vlblocks.app.describe import ExampleShape
    from vlblocks.app.describe import describe as describe_model
    from vlblocks.app.recipes import RecipeError, build_from_recipe, describe_files, parse_recipe
    from vlblocks.app.registry import build_model

    try:
        height, width = (int(side) for side in image_size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH, got {image_size!r}", param_hint="--image-size") from None
    try:
        files = parse_recipe(recipe, bind or [])
        model = build_from_recipe(recipe, build_model, echo=typer.echo)
    except RecipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(describe_files(files))
    shape = ExampleShape(text_length=text_length, regions=regions, image_height=height, image_width=width)
    typer.echo(describe_model(model, shape, max_depth=depth))


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="A recipe, e.g. recipes/vlbert_base.gin, recipes/demo/vlbert_demo.gin or recipes/finetune/vqa_base.gin."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    out: Path = typer.Option(Path("runs/latest"), "--out", help="Folder for metrics.jsonl, recipe.gin and checkpoints/."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint, exactly where it stopped."),
) -> None:
    """Pre-train or fine-tune a model; with no data configured, on the embedded demo data.

    Checkpoints go to OUT/checkpoints/step-XXXXXXX/; Ctrl-C writes one of the last finished step
    and stops, and `--resume` continues a stopped or killed run."""
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import format_results, train_from_recipe
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError
    from vlblocks.train.loop import TrainingInterrupted, TrainingStopped

    resolved, precision = _device_and_precision(device, precision)
    try:
        results = train_from_recipe(
            recipe, bind or [], out, max_steps, echo=typer.echo, device=resolved, precision=precision, resume=resume
        )
    except (RecipeError, CheckpointError, DataError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except TrainingStopped as stopped:
        typer.echo(f"stopped: {stopped}", err=True)
        raise typer.Exit(130 if isinstance(stopped, TrainingInterrupted) else 1) from None
    typer.echo(f"validation after training:\n{format_results(results)}")
    typer.echo(f"metrics: {out / 'metrics.jsonl'}; checkpoints: {out / 'checkpoints'}")


@app.command("eval")
def evaluate(
    recipe: Path = typer.Argument(..., help="The recipe the checkpoint was trained with."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder written by vlblocks train (OUT/checkpoints/step-XXXXXXX)."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    batch_size: int = typer.Option(64, help="Validation batch size."),
    max_batches: Optional[int] = typer.Option(None, help="Evaluate on at most this many batches."),
    ablations: bool = typer.Option(True, help="Pre-training: also evaluate with every image blanked and with every caption dropped."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Where to write the results as JSON; default CHECKPOINT/eval.json."),
) -> None:
    """Validation metrics as a table: pre-training's masked-word and masked-region accuracy (with
    the image blanked and the caption dropped as further columns), or a fine-tuning task's
    accuracy; the same numbers go to a JSON file (replaced atomically)."""
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import eval_from_recipe, format_results, results_file, write_results
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    resolved, precision = _device_and_precision(device, precision)
    try:
        target = results_file(checkpoint, json_path)
        results = eval_from_recipe(
            recipe, bind or [], checkpoint, batch_size, max_batches, ablations, echo=typer.echo, device=resolved, precision=precision
        )
        write_results(results, target)
    except (RecipeError, CheckpointError, DataError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))
    typer.echo(f"results: {target}")


@app.command("eval-vcr-joint")
def evaluate_vcr_joint(
    answer_recipe: Path = typer.Option(..., "--answer-recipe", help="The Q->A recipe."),
    answer_checkpoint: Path = typer.Option(..., "--answer-checkpoint", help="The Q->A checkpoint folder."),
    rationale_recipe: Path = typer.Option(..., "--rationale-recipe", help="The QA->R recipe."),
    rationale_checkpoint: Path = typer.Option(..., "--rationale-checkpoint", help="The QA->R checkpoint folder."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    batch_size: int = typer.Option(16, help="Questions per batch."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON to this file (replaced atomically)."),
) -> None:
    """VCR Q->A, QA->R and joint Q->AR accuracy (both right) on the recipes' validation split, as a table."""
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import format_results, results_file, write_results
    from vlblocks.app.vcr_joint import vcr_joint_from_recipes
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        target = results_file(answer_checkpoint, json_path) if json_path is not None else None
        results = vcr_joint_from_recipes(
            answer_recipe, answer_checkpoint, rationale_recipe, rationale_checkpoint, bind or [], batch_size, typer.echo, device
        )
        if target is not None:
            write_results(results, target)
    except (RecipeError, CheckpointError, DataError, OSError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))
    if target is not None:
        typer.echo(f"results: {target}")


@app.command("attention")
def attention(
    recipe: Path = typer.Argument(..., help="The end-to-end pre-training recipe the checkpoint was trained with."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder written by vlblocks train (OUT/checkpoints/step-XXXXXXX)."),
    image: Path = typer.Option(..., "--image", help="The image."),
    text: str = typer.Option(..., "--text", help="The caption whose words are drawn."),
    boxes: Optional[str] = typer.Option(None, "--boxes", help="Regions in the image's pixels, 'x1,y1,x2,y2;...', or 'grid' / 'grid:N' for an N x N grid."),
    boxes_file: Optional[Path] = typer.Option(None, "--boxes-file", help="Regions from a file: a JSON list of \\[x1, y1, x2, y2], or one 'x1,y1,x2,y2' per line."),
    layer: str = typer.Option("all", "--layer", help="A layer number (1 = first) or 'all' for the mean over the layers; heads are always averaged."),
    out: Path = typer.Option(..., "--out", help="The .png to write: one panel per word, boxes shaded by its attention."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Draw how much each word of a caption attends to each region of an image."""
    from vlblocks.app.attention import attention_map, format_attention
    from vlblocks.app.inference import InferenceError
    from vlblocks.app.recipes import RecipeError
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    resolved, _ = _device_and_precision(device, None)
    try:
        result = attention_map(recipe, bind or [], checkpoint, image, text, boxes, boxes_file, out, layer, resolved, typer.echo)
    except (InferenceError, RecipeError, CheckpointError, DataError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_attention(result))
    typer.echo(f"wrote {out}")


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="A fine-tuning checkpoint folder (OUT/checkpoints/step-XXXXXXX) or its model.safetensors."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe the checkpoint was trained with."),
    out: Path = typer.Option(..., "--out", help="The folder to write (new or empty): vlblocks.load(OUT) rebuilds the model from it alone."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
) -> None:
    """A self-contained folder for predictions (resolved recipe, weights, vocab.txt, answers,
    preprocessing) with the text Transformer as a transformers BertModel in OUT/bert."""
    from vlblocks.app.export import export_model
    from vlblocks.app.inference import InferenceError
    from vlblocks.app.recipes import RecipeError
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        export_model(checkpoint, recipe, out, bind or [], echo=typer.echo)
    except (InferenceError, RecipeError, CheckpointError, DataError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@app.command("plot")
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders written by vlblocks train --out (each holds metrics.jsonl); several are overlaid."),
    out: Optional[Path] = typer.Option(None, "--out", help="The .png to write (a folder gets curves.png); default RUN_DIR/curves.png for one run, ./curves.png for several."),
) -> None:
    """Draw the training and validation curves of one or more runs: a panel per metric, a row per
    objective, one colour per run."""
    from vlblocks.app.plot import PlotError, plot_runs

    try:
        plot_runs(run_dirs, out, echo=typer.echo)
    except (PlotError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


convert_app = typer.Typer(help="Convert weights written by other code into vlblocks checkpoints, and vlblocks checkpoints into transformers folders.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("official")
def convert_official_checkpoint(
    checkpoint: Path = typer.Argument(..., help="An official VL-BERT .model file (vl-bert-base-e2e.model, a fine-tuned VQA/VCR/RefCOCO+ one)."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe whose task the weights are for, e.g. recipes/vlbert_base.gin or recipes/finetune/vqa_base.gin."),
    out: Path = typer.Option(..., "--out", help="The .safetensors file to write (a folder gets model.safetensors)."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="An official key prefix to drop on purpose, e.g. aux_text_visual_embedding. Repeatable."),
) -> None:
    """Convert an official VL-BERT checkpoint into a vlblocks checkpoint for RECIPE's task, strictly:
    every official tensor placed (or named in an error), nothing written on failure."""
    from vlblocks.app.convert import convert_official
    from vlblocks.app.recipes import RecipeError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        written = convert_official(checkpoint, recipe, out, bind or [], ignore or [], echo=typer.echo)
    except (RecipeError, CheckpointError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {written}")


@convert_app.command("hf")
def convert_hf_folder(
    directory: Path = typer.Argument(..., help="A transformers model folder (save_pretrained: config.json + model.safetensors or pytorch_model.bin) of VisualBERT or LXMERT."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe whose task the weights are for, e.g. recipes/variants/visualbert.gin."),
    out: Path = typer.Option(..., "--out", help="The .safetensors file to write (a folder gets model.safetensors)."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
) -> None:
    """Convert a transformers VisualBERT / LXMERT folder into a vlblocks checkpoint for RECIPE's task,
    strictly: every tensor placed (or named in an error), nothing written on failure."""
    from vlblocks.app.convert_hf import convert_hf
    from vlblocks.app.recipes import RecipeError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        written = convert_hf(directory, recipe, out, bind or [], echo=typer.echo)
    except (RecipeError, CheckpointError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {written}")


@convert_app.command("to-hf")
def convert_to_hf_folder(
    checkpoint: Path = typer.Argument(..., help="A pre-training checkpoint folder (OUT/checkpoints/step-XXXXXXX) or its model.safetensors."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe the checkpoint was written with, e.g. recipes/variants/visualbert.gin."),
    out: Path = typer.Option(..., "--out", help="The folder to write (new or empty): transformers' *ForPreTraining.from_pretrained(OUT) loads it."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
) -> None:
    """Write a vlblocks VisualBERT / LXMERT pre-training checkpoint as a transformers folder
    (VisualBertForPreTraining / LxmertForPreTraining), strictly."""
    from vlblocks.app.convert_hf import export_hf
    from vlblocks.app.recipes import RecipeError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        export_hf(checkpoint, recipe, out, bind or [], echo=typer.echo)
    except (RecipeError, CheckpointError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@app.command()
def predict(
    recipe: Path = typer.Argument(..., help="The recipe the checkpoint was fine-tuned with (VQA, RefCOCO+, or VCR's Q->A)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder written by vlblocks train."),
    split: str = typer.Option(..., "--split", help="The split to predict, e.g. test-dev2015 / test2015 (VQA), test or val (VCR), testA / testB (RefCOCO+)."),
    out: Path = typer.Option(..., "--out", help="The file to write: VQA/RefCOCO+ results .json, VCR leaderboard .csv."),
    rationale_recipe: Optional[Path] = typer.Option(None, "--rationale-recipe", help="VCR: the QA->R recipe (required for VCR)."),
    rationale_checkpoint: Optional[Path] = typer.Option(None, "--rationale-checkpoint", help="VCR: the QA->R checkpoint folder (required for VCR)."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    batch_size: int = typer.Option(16, "--batch-size", help="Questions or expressions per batch."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Write the file an evaluation server takes (VQA v2 EvalAI json, VCR leaderboard csv,
    RefCOCO+ boxes) for SPLIT; print the accuracy when the split has labels."""
    from vlblocks.app.predict import predict_from_recipe
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import format_results
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        results = predict_from_recipe(
            recipe, checkpoint, split, out, bind or [], batch_size, device, typer.echo, rationale_recipe, rationale_checkpoint
        )
    except (RecipeError, CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))
    typer.echo(f"wrote {out}")


data_app = typer.Typer(help="Check and convert datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="A data file (or a folder of per-image feature files)."),
    format: str = typer.Option(..., "--format", help="cc, vqa, coco-captions, vcr, refcoco, butd-tsv, npz or feature-json."),
    annotations: Optional[Path] = typer.Option(None, help="vqa: the annotations file to join with the questions."),
    images: Optional[Path] = typer.Option(None, help="coco-captions / vcr: the image folder."),
    instances: Optional[Path] = typer.Option(None, help="refcoco: COCO instances.json."),
    proposals: Optional[Path] = typer.Option(None, help="refcoco: a detections file (MAttNet format) instead of GT boxes."),
    limit: int = typer.Option(50, help="Print at most this many problems."),
) -> None:
    """Read every record and report each problem with its file, record and field; exit 1 if any."""
    from vlblocks.data.formats.validate import validate

    try:
        report = validate(path, format, annotations, images, instances, proposals)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for problem in report.problems[:limit]:
        typer.echo(problem)
    if len(report.problems) > limit:
        typer.echo(f"... and {len(report.problems) - limit} more")
    typer.echo(f"{report.records} records read, {len(report.problems)} with problems")
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("pack")
def data_pack(
    source: Path = typer.Argument(..., help="A bottom-up-attention TSV, or a file/folder of per-image .npz or .json features."),
    destination: Path = typer.Argument(..., help="Folder for the packed store."),
    format: str = typer.Option(..., "--format", help="butd-tsv, npz or feature-json."),
    dtype: str = typer.Option("float32", help="float32 or float16 for the features."),
) -> None:
    """Pack region features into one memory-mapped store (O(1) access, no per-sample file opens)."""
    from vlblocks.data.errors import DataError
    from vlblocks.data.formats.feature_store import FeatureStore
    from vlblocks.data.formats.validate import pack

    try:
        directory = pack(source, destination, format, dtype)
    except (DataError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"packed {len(FeatureStore(directory))} images into {directory}")


def main() -> None:
    restart_with_tuned_allocator()
    app()
