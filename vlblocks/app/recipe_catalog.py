"""What `vlblocks recipes` lists: the bundled recipes with one line each, and every configurable name."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Optional

from vlblocks.app.recipes import bundled_recipes
from vlblocks.app.registry import REGISTERED, REGISTERED_FUNCTIONS, build_model, experiment


def recipe_summary(path: Path) -> str:
    """The recipe's first comment line (what it trains, on what data), without the '#'."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def bundled_recipe_lines() -> list[str]:
    """`name  summary` for every bundled recipe (the name `vlblocks train NAME` takes), by folder."""
    root = bundled_recipes()
    paths = sorted(root.rglob("*.gin"), key=lambda path: (len(path.relative_to(root).parts), str(path.relative_to(root))))
    entries = [(str(path.relative_to(root).with_suffix("")), recipe_summary(path)) for path in paths]
    width = max(len(name) for name, _ in entries)
    return [f"bundled recipes in {root} (vlblocks train NAME, or include 'NAME.gin'):"] + [f"  {name:<{width}}  {summary}" for name, summary in entries]


def _parameters(configurable) -> list[str]:
    signature = inspect.signature(configurable)
    shown = []
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "args", "kwargs") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        shown.append(f"    {parameter.name} = {default}")
    return shown


def configurable_lines(name: Optional[str] = None) -> list[str]:
    """Every configurable a recipe may bind with its parameters and defaults (or only `name`),
    read from the code (the gin registry).

    Raises:
        KeyError: `name` is not a configurable (the message has close matches).
    """
    configurables = {item.__name__: item for item in (*REGISTERED, *REGISTERED_FUNCTIONS, build_model, experiment)}
    if name is not None:
        if name not in configurables:
            matches = difflib.get_close_matches(name, list(configurables), n=3, cutoff=0.5)
            raise KeyError(f"no configurable named {name!r}" + (f"; did you mean: {', '.join(matches)}?" if matches else ""))
        configurables = {name: configurables[name]}
    lines = []
    for key in sorted(configurables, key=str.lower):
        lines.append(key)
        lines.extend(_parameters(configurables[key]))
    return lines
