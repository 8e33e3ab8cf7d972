"""The `vlblocks` command line: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="vlblocks: composable blocks for visual-linguistic Transformers (VL-BERT).", no_args_is_help=True)

BIND_HELP = "A gin binding that overrides the recipe, e.g. --bind 'TransformerEncoder.num_layers = 6'. Repeatable."


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
    from vlblocks.config import RecipeError, model_from_recipe
    from vlblocks.describe import ExampleShape
    from vlblocks.describe import describe as describe_model

    try:
        height, width = (int(side) for side in image_size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH, got {image_size!r}", param_hint="--image-size") from None
    try:
        model = model_from_recipe(recipe, bind or [])
    except RecipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    shape = ExampleShape(text_length=text_length, regions=regions, image_height=height, image_width=width)
    typer.echo(describe_model(model, shape, max_depth=depth))


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="A pre-training recipe, e.g. recipes/vlbert_base.gin or recipes/demo/vlbert_demo.gin."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    out: Path = typer.Option(Path("runs/latest"), "--out", help="Folder for metrics.jsonl, recipe.gin and checkpoints/."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps."),
) -> None:
    """Pre-train a model; with no data configured, on the embedded demo dataset."""
    from vlblocks.config import RecipeError
    from vlblocks.train.run import format_results, train_from_recipe

    try:
        results = train_from_recipe(recipe, bind or [], out, max_steps, echo=typer.echo)
    except RecipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"validation after training:\n{format_results(results)}")
    typer.echo(f"metrics: {out / 'metrics.jsonl'}; checkpoints: {out / 'checkpoints'}")


@app.command("eval")
def evaluate(
    recipe: Path = typer.Argument(..., help="The recipe the checkpoint was trained with."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .safetensors checkpoint written by vlblocks train."),
    bind: Optional[List[str]] = typer.Option(None, "--bind", "-b", help=BIND_HELP),
    batch_size: int = typer.Option(64, help="Validation batch size."),
    max_batches: Optional[int] = typer.Option(None, help="Evaluate on at most this many batches."),
    ablations: bool = typer.Option(True, help="Also evaluate with every image blanked and with every caption dropped."),
) -> None:
    """Pre-training metrics on the validation split (masked-word and masked-region accuracy)."""
    from vlblocks.config import RecipeError
    from vlblocks.interop.hf_bert import CheckpointError
    from vlblocks.train.run import eval_from_recipe, format_results

    try:
        results = eval_from_recipe(recipe, bind or [], checkpoint, batch_size, max_batches, ablations)
    except (RecipeError, CheckpointError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_results(results))


def main() -> None:
    app()
