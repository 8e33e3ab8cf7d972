"""Recipes: parse a gin file with `--bind` overrides, resolve its includes, and turn gin's
errors into a `RecipeError` that names the file, line and binding, with close matches."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tokenize
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import gin
from torch import nn

from vlblocks.app.registry import DEFAULT_BINDINGS, build_model, registered_names, reports_to
from vlblocks.contracts import Echo

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe could not be parsed or built; the message names the file, line and binding."""


CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe_search_paths(recipe: Path) -> list[Path]:
    """Folders `include` statements are resolved against: the recipe's own, the enclosing
    `recipes/`, and the recipes of this checkout (so a user's recipe anywhere can include ours)."""
    paths = [recipe.parent]
    for parent in recipe.resolve().parents:
        if parent.name == "recipes":
            paths.append(parent)
            break
    if CHECKOUT_RECIPES.is_dir() and CHECKOUT_RECIPES not in paths:
        paths.append(CHECKOUT_RECIPES)
    return paths


def _close_matches_hint(message: str) -> str:
    names = registered_names()
    unknown = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)", message)
    if unknown:
        matches = difflib.get_close_matches(unknown.group(1).split(".")[-1], list(names), n=3, cutoff=0.5)
        return f"\n  Did you mean: {', '.join(matches)}?" if matches else f"\n  Known names: {', '.join(sorted(names))}"
    parameter = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if parameter:
        owner = parameter.group(1).split(".")[-1]
        known = names.get(owner, [])
        matches = difflib.get_close_matches(parameter.group(2), known, n=3, cutoff=0.5)
        hint = f"Did you mean: {', '.join(matches)}?" if matches else ""
        return f"\n  {hint}\n  {owner} takes: {', '.join(known)}".rstrip()
    return ""


@contextlib.contextmanager
def _includes_resolved_in(folders: Sequence[Path]) -> Iterator[None]:
    """Resolve `include` statements against `folders` (then the working directory), as plain files.

    gin keeps global include prefixes and also probes the Python path, which crashes on folders
    that look like namespace packages; recipes are plain files, so only those are looked up.
    """
    prefixes, readers = list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS)
    gin.config._LOCATION_PREFIXES[:] = [*(str(folder) for folder in folders), ""]
    gin.config._FILE_READERS[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        gin.config._LOCATION_PREFIXES[:] = prefixes
        gin.config._FILE_READERS[:] = readers


def parse_recipe(recipe: str | Path, bindings: Sequence[str] = ()) -> None:
    """Clear gin's state and load `DEFAULT_BINDINGS`, `recipe`, then `--bind` overrides
    ('Name.param = value'), each able to rebind what came before.

    Raises:
        RecipeError: naming the file, line and binding at fault, with close matches for a
            misspelt configurable or parameter.
    """
    recipe = Path(recipe)
    if not recipe.is_file():
        raise RecipeError(f"recipe not found: {recipe}")
    gin.clear_config()
    try:
        gin.parse_config(DEFAULT_BINDINGS)
        with _includes_resolved_in(recipe_search_paths(recipe)):
            gin.parse_config_files_and_bindings([str(recipe)], list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError, OSError) as error:
        message = str(error)
        if "In file" not in message and "In bindings string" not in message:
            message = f"{message}\n  In file \"{recipe}\""
        raise RecipeError(message + _close_matches_hint(message)) from None
    except tokenize.TokenError as error:
        raise RecipeError(f"{recipe}: unfinished statement ({error.args[0]}) near line {error.args[1][0]}") from None


def build_from_recipe(recipe: str | Path, build: Callable[[], T], echo: Echo = print) -> T:
    """Call `build()` under the parsed recipe, turning configuration errors into a `RecipeError`;
    what the build reports (a BERT weight load) goes to `echo`."""
    try:
        with reports_to(echo):
            return build()
    except (ValueError, TypeError) as error:
        message = str(error)
        raise RecipeError(f"building from {recipe} failed: {message}{_close_matches_hint(message)}") from None


def model_from_recipe(recipe: str | Path, bindings: Sequence[str] = (), echo: Echo = print) -> nn.Module:
    """Parse a recipe and build its model (`build_model.model`)."""
    parse_recipe(recipe, bindings)
    return build_from_recipe(recipe, build_model, echo)
