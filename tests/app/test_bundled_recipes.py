"""Recipes ship inside the package and resolve by name from any folder; `vlblocks recipes` and
`--version`; a built wheel, installed alone, builds models from bundled recipes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vlblocks
from vlblocks.app.recipes import RecipeError, bundled_recipes, model_from_recipe, parse_recipe, resolve_recipe
from vlblocks.cli.app import app

ROOT = Path(__file__).resolve().parents[2]


def test_names_and_checkout_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = bundled_recipes() / "vlbert_base.gin"
    for name in ("vlbert_base", "vlbert_base.gin", "recipes/vlbert_base.gin"):
        assert resolve_recipe(name) == expected
    assert resolve_recipe("demo/vlbert_demo") == bundled_recipes() / "demo" / "vlbert_demo.gin"
    with pytest.raises(RecipeError, match="vlblocks recipes"):
        resolve_recipe("no_such_recipe")
    mine = tmp_path / "vlbert_base.gin"
    mine.write_text("include 'models/vlbert_tiny.gin'\n")
    assert resolve_recipe("vlbert_base.gin") == Path("vlbert_base.gin"), "a file in the working folder comes first"


def test_a_users_folder_shadows_a_bundled_include_and_the_files_read_are_reported(tmp_path):
    (tmp_path / "models").mkdir()
    bundled_tiny = (bundled_recipes() / "models" / "vlbert_tiny.gin").read_text()
    (tmp_path / "models" / "vlbert_tiny.gin").write_text(bundled_tiny.replace("NUM_LAYERS = 2", "NUM_LAYERS = 1"))
    recipe = tmp_path / "mine.gin"
    recipe.write_text("include 'models/vlbert_tiny.gin'\n")
    read = parse_recipe(recipe)
    assert read[0] == recipe and read[1] == tmp_path / "models" / "vlbert_tiny.gin", "the user's file shadows the bundled one"
    assert read[2] == bundled_recipes() / "models" / "vlbert.gin"
    result = CliRunner().invoke(app, ["describe", str(recipe), "--depth", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"recipe: {recipe} (includes {read[1]}, {read[2]})"
    assert len(model_from_recipe(recipe).vlbert.encoder.layer) == 1, "built from the user's file"


def test_recipes_command_lists_bundled_recipes_and_configurables():
    listing = CliRunner().invoke(app, ["recipes"])
    assert listing.exit_code == 0, listing.output
    bundled = sorted(str(path.relative_to(bundled_recipes()).with_suffix("")) for path in bundled_recipes().rglob("*.gin"))
    listed = [line.split()[0] for line in listing.output.splitlines()[1:]]
    assert sorted(listed) == bundled
    assert any(line.split()[0] == "vlbert_base" and "BASE" in line for line in listing.output.splitlines()[1:])
    names = CliRunner().invoke(app, ["recipes", "--names", "TransformerEncoder"])
    assert names.exit_code == 0 and "    num_layers = 12" in names.output.splitlines()
    assert "    hidden_size = 768" in names.output.splitlines()
    wrong = CliRunner().invoke(app, ["recipes", "--names", "TransformerEncodr"])
    assert wrong.exit_code != 0 and "TransformerEncoder" in wrong.output


def test_version_lives_in_one_place():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vlblocks {vlblocks.__version__}"
    assert "version = " not in (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("[")[0], "pyproject reads it"


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_builds_from_them_outside_the_checkout(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    quiet = dict(check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)], **quiet)
    (wheel,) = wheels.glob("vlblocks-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], **quiet)
    (elsewhere / "mine.gin").write_text("include 'models/vlbert_tiny.gin'\nTransformerEncoder.num_layers = 3\n")
    script = textwrap.dedent(f"""
        import vlblocks
        from pathlib import Path
        from vlblocks.app.recipes import bundled_recipes, model_from_recipe
        assert Path(vlblocks.__file__).is_relative_to({str(site)!r}), vlblocks.__file__
        assert bundled_recipes() == Path({str(site)!r}) / "vlblocks" / "recipes", bundled_recipes()
        by_name = model_from_recipe("models/vlbert_tiny")
        mine = model_from_recipe("mine.gin")
        print(len(by_name.vlbert.encoder.layer), len(mine.vlbert.encoder.layer))
    """)
    environment = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "3"]
