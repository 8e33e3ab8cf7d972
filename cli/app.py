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


@app.callback()
def _root() -> None:
    """vlblocks: composable blocks for visual-linguistic Transformers (VL-BERT)."""


@app.command()
def describe(
    recipe: Path = typer.Argument(..., help="A gin recipe, e.g. recipes/models/vlbert_base.gin."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    text_length: int = typer.Option(32, help="Text tokens in the sample FLOPs are counted on."),
    regions: int = typer.Option(36, help="Regions (whole image included) in that sample."),
    image_size: str = typer.Option("600x800", help="HEIGHTxWIDTH of that sample's image (end-to-end models)."),
    depth: int = typer.Option(3, help="How many levels of the module tree to show."),
) -> None:
    """Print the recipe's model as a tree with parameter counts and FLOPs per sample."""
    from vlblocks.app.describe import ExampleShape
    from vlblocks.app.describe import describe as describe_model
    from vlblocks.app.recipes import RecipeError, model_from_recipe

    try:
        height, width = (int(side) for side in image_size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH, got {image_size!r}", param_hint="--image-size") from None
    try:
        model = model_from_recipe(recipe, bind or [], echo=typer.echo)
    except RecipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
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
) -> None:
    """Validation metrics: pre-training's masked-word and masked-region accuracy (with the
    ablations), or a fine-tuning task's accuracy."""
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import eval_from_recipe, format_results
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    resolved, precision = _device_and_precision(device, precision)
    try:
        results = eval_from_recipe(
            recipe, bind or [], checkpoint, batch_size, max_batches, ablations, echo=typer.echo, device=resolved, precision=precision
        )
    except (RecipeError, CheckpointError, DataError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))


@app.command("eval-vcr-joint")
def evaluate_vcr_joint(
    answer_recipe: Path = typer.Option(..., "--answer-recipe", help="The Q->A recipe."),
    answer_checkpoint: Path = typer.Option(..., "--answer-checkpoint", help="The Q->A checkpoint folder."),
    rationale_recipe: Path = typer.Option(..., "--rationale-recipe", help="The QA->R recipe."),
    rationale_checkpoint: Path = typer.Option(..., "--rationale-checkpoint", help="The QA->R checkpoint folder."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    batch_size: int = typer.Option(16, help="Questions per batch."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """VCR Q->A, QA->R and joint Q->AR accuracy (both right) on the recipes' validation split."""
    from vlblocks.app.recipes import RecipeError
    from vlblocks.app.run import format_results
    from vlblocks.app.vcr_joint import vcr_joint_from_recipes
    from vlblocks.data.errors import DataError
    from vlblocks.train.checkpoint import CheckpointError

    try:
        results = vcr_joint_from_recipes(
            answer_recipe, answer_checkpoint, rationale_recipe, rationale_checkpoint, bind or [], batch_size, typer.echo, device
        )
    except (RecipeError, CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))


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
