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


# Where the bundled recipes are: inside the installed package (the wheel maps `recipes/` to
# `vlblocks/recipes/`), or in the checkout beside the package (an editable install).
INSTALLED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def bundled_recipes() -> Path:
    """The folder of the recipes that ship with vlblocks."""
    return INSTALLED_RECIPES if INSTALLED_RECIPES.is_dir() else CHECKOUT_RECIPES


def resolve_recipe(recipe: str | Path) -> Path:
    """The recipe file to read: `recipe` itself when it is a file; else, for a relative path or a
    name, the bundled recipe of that name (`vlbert_base`, `vlbert_base.gin`,
    `recipes/vlbert_base.gin` and `demo/vlbert_demo` all work from any folder).

    Raises:
        RecipeError: neither a file nor a bundled recipe.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    if not path.is_absolute():
        parts = path.parts[1:] if path.parts and path.parts[0] == "recipes" else path.parts
        if parts:
            relative = Path(*parts)
            for candidate in (relative, relative.with_name(relative.name + ".gin")):
                bundled = bundled_recipes() / candidate
                if bundled.is_file():
                    return bundled
    raise RecipeError(f"recipe not found: {recipe} (neither a file nor a bundled recipe; `vlblocks recipes` lists them)")


def recipe_search_paths(recipe: Path) -> list[Path]:
    """Folders `include` statements are resolved against, in order: the recipe's own, the
    enclosing `recipes/`, and the bundled recipes (so a user's recipe anywhere can include ours,
    and a file of the same name in the user's folder shadows the bundled one)."""
    paths = [recipe.parent]
    for parent in recipe.resolve().parents:
        if parent.name == "recipes":
            paths.append(parent)
            break
    bundled = bundled_recipes()
    if bundled.is_dir() and bundled not in paths:
        paths.append(bundled)
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
def _includes_resolved_in(folders: Sequence[Path], read: list[Path]) -> Iterator[None]:
    """Resolve `include` statements against `folders` (then the working directory), as plain
    files, appending each file read to `read`.

    gin keeps global include prefixes and also probes the Python path, which crashes on folders
    that look like namespace packages; recipes are plain files, so only those are looked up.
    """

    def open_and_record(path: str, *args, **kwargs):
        read.append(Path(path))
        return open(path, *args, **kwargs)

    prefixes, readers = list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS)
    gin.config._LOCATION_PREFIXES[:] = [*(str(folder) for folder in folders), ""]
    gin.config._FILE_READERS[:] = [(open_and_record, os.path.isfile)]
    try:
        yield
    finally:
        gin.config._LOCATION_PREFIXES[:] = prefixes
        gin.config._FILE_READERS[:] = readers


def parse_recipe(recipe: str | Path, bindings: Sequence[str] = ()) -> list[Path]:
    """Clear gin's state and load `DEFAULT_BINDINGS`, `recipe` (a file, or a bundled recipe's
    name: `resolve_recipe`), then `--bind` overrides ('Name.param = value'), each able to rebind
    what came before. Returns the files read: the recipe, then its includes in reading order.

    Raises:
        RecipeError: naming the file, line and binding at fault, with close matches for a
            misspelt configurable or parameter.
    """
    recipe = resolve_recipe(recipe)
    read: list[Path] = []
    gin.clear_config()
    try:
        gin.parse_config(DEFAULT_BINDINGS)
        with _includes_resolved_in(recipe_search_paths(recipe), read):
            gin.parse_config_files_and_bindings([str(recipe)], list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError, OSError) as error:
        message = str(error)
        if "In file" not in message and "In bindings string" not in message:
            message = f"{message}\n  In file \"{recipe}\""
        raise RecipeError(message + _close_matches_hint(message)) from None
    except tokenize.TokenError as error:
        raise RecipeError(f"{recipe}: unfinished statement ({error.args[0]}) near line {error.args[1][0]}") from None
    return read


def describe_files(read: Sequence[Path]) -> str:
    """One line saying which recipe file was read and which files it included."""
    line = f"recipe: {read[0]}" if read else "recipe: (none)"
    return line + (f" (includes {', '.join(str(path) for path in read[1:])})" if len(read) > 1 else "")


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
