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


def main() -> None:
    app()
