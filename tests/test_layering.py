"""The house stays straight: every package says in its `__init__` what it may import, and the
imports are read here and held to it. Layers point one way (no import from a higher layer, no
cycle between packages), the data column never reaches into the model column, and every package
ships in the wheel."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"vlblocks": ROOT / "vlblocks", "vlblocks.cli": ROOT / "cli"}  # package name -> folder
TOP_LEVEL_OWNERS = {"vlblocks.__main__": "vlblocks.cli", "vlblocks": "vlblocks.app"}
MODEL_COLUMN_AND_ABOVE = (
    "vlblocks.blocks", "vlblocks.models", "vlblocks.objectives", "vlblocks.train", "vlblocks.interop", "vlblocks.app", "vlblocks.cli",
)


def find_packages(sources: dict[str, Path]) -> dict[str, Path]:
    """Dotted package name -> folder, for every folder with an `__init__.py` under the sources."""
    packages = {}
    for name, folder in sources.items():
        for init in sorted(folder.rglob("__init__.py")):
            packages[".".join((name, *init.parent.relative_to(folder).parts))] = init.parent
    return packages


def find_modules(packages: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    """Dotted module name -> (its package, file); a package's `__init__` is the package itself,
    `vlblocks/__main__.py` (`python -m vlblocks`) belongs to the CLI it starts, and the top-level
    `vlblocks/__init__.py`, which only re-exports the application's `load`, to the app layer."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[module] = (TOP_LEVEL_OWNERS.get(module, package), path)
    return modules


def declared_imports(init: Path) -> set[str]:
    """The packages and modules the second line of the `__init__` docstring allows,
    `May import: a, b.` (or `May import: nothing else of vlblocks.`)."""
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    lines = docstring.splitlines()
    if len(lines) != 2 or not lines[1].startswith("May import:"):
        raise AssertionError(f"{init}: the docstring must be two lines, what lives here and 'May import: ...', got {docstring!r}")
    allowed = lines[1][len("May import:") :].strip().rstrip(".")
    return set() if allowed.startswith("nothing") else {entry.strip() for entry in allowed.split(",")}


def imported_names(path: Path, package: str, modules: dict) -> list[str]:
    """Every vlblocks module that `path` imports, at any depth (lazy imports too): `from m import
    a` names the module `m.a` when there is one, else `m`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [name for name in names if name in modules]


def package_imports(sources: dict[str, Path]) -> list[tuple[str, str, str, Path]]:
    """(importing package, imported package, imported module, file) for every import between
    vlblocks modules."""
    modules = find_modules(find_packages(sources))
    return [
        (package, modules[name][0], name, path)
        for package, path in modules.values()
        for name in imported_names(path, package, modules)
    ]


def layering_violations(sources: dict[str, Path]) -> list[str]:
    """Each import that the importing package's `May import` line does not allow."""
    packages = find_packages(sources)
    declared = {package: declared_imports(folder / "__init__.py") for package, folder in packages.items()}
    problems = []
    for importer, imported_package, imported, path in package_imports(sources):
        allowed = declared[importer]
        if imported_package != importer and imported_package not in allowed and imported not in allowed:
            problems.append(f"{path} imports {imported}, but {importer} may import only: {', '.join(sorted(allowed)) or 'nothing'}")
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the directed graph as a list of nodes (first = last), or [] when it has none."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor, path + [successor])):
                return cycle
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return []


def declared_graph(sources: dict[str, Path]) -> dict[str, set[str]]:
    """Package -> the packages its `May import` line allows (a module entry counts as its package)."""
    packages = find_packages(sources)
    modules = find_modules(packages)
    return {
        package: {modules[entry][0] for entry in declared_imports(folder / "__init__.py") if entry in modules} - {package}
        for package, folder in packages.items()
    }


def import_graph(sources: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported_package, _, _ in package_imports(sources):
        if imported_package != importer:
            graph.setdefault(importer, set()).add(imported_package)
    return graph


def test_every_package_says_what_lives_there_and_what_it_may_import():
    packages = find_packages(SOURCES)
    modules = find_modules(packages)
    assert {"vlblocks.ops", "vlblocks.data.formats", "vlblocks.data.pipeline", "vlblocks.data.demo", "vlblocks.data.datasets", "vlblocks.app"} <= set(packages)
    for package, folder in packages.items():
        for entry in declared_imports(folder / "__init__.py"):
            assert entry in modules, f"{package}'s __init__ allows {entry!r}, which is no vlblocks package or module"


def test_no_module_imports_from_a_layer_it_may_not():
    assert layering_violations(SOURCES) == []


def test_packages_import_each_other_in_one_direction_only():
    assert find_cycle(import_graph(SOURCES)) == []
    assert find_cycle(declared_graph(SOURCES)) == [], "the May import lines of the __init__ files allow a cycle"


def test_every_module_is_in_a_package_and_imported_by_name():
    """A folder without `__init__.py` would escape the checks above (and the wheel), and an
    import by a computed name (`importlib.import_module`, `__import__`) could not be read."""
    for name, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            assert (path.parent / "__init__.py").is_file(), f"{path.parent} holds modules but no __init__.py"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    assert called not in ("import_module", "__import__"), f"{path}:{node.lineno} imports by a computed name"


def test_the_data_column_never_imports_the_model_column():
    for package, folder in find_packages(SOURCES).items():
        if package == "vlblocks.data" or package.startswith("vlblocks.data."):
            reached = {entry for entry in declared_imports(folder / "__init__.py") if entry.startswith(MODEL_COLUMN_AND_ABOVE)}
            assert not reached, f"{package} may import {reached}"


def test_every_package_ships_in_the_wheel():
    listing = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.DOTALL | re.MULTILINE)
    shipped = set(re.findall(r'"([\w.]+)"', listing.group(1)))
    assert shipped - {"vlblocks.recipes"} == set(find_packages(SOURCES)), "every code package, and the recipes (data only)"


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_the_checker_finds_upward_imports_cycles_and_missing_declarations(tmp_path):
    """The rules above can fail: a made-up package tree with an upward import, a lazy one, a
    relative one, and so a cycle; then a package that does not say what it may import."""
    _write(tmp_path, {
        "__init__.py": '"""Root.\nMay import: nothing else of vlblocks.\n"""\n',
        "base.py": "",
        "low/__init__.py": '"""Low layer.\nMay import: vlblocks.base.\n"""\n',
        "low/a.py": "from vlblocks.base import x\nfrom vlblocks.high.b import y\n",
        "low/lazy.py": "def f():\n    import vlblocks.high.b\n",
        "high/__init__.py": '"""High layer.\nMay import: vlblocks.low.\n"""\n',
        "high/b.py": "from vlblocks.low import a\nfrom ..low import lazy\n",
    })
    sources = {"vlblocks": tmp_path}
    problems = layering_violations(sources)
    assert len(problems) == 2 and all("imports vlblocks.high.b, but vlblocks.low may import only: vlblocks.base" in p for p in problems)
    assert find_cycle(import_graph(sources)) in (["vlblocks.high", "vlblocks.low", "vlblocks.high"], ["vlblocks.low", "vlblocks.high", "vlblocks.low"])
    _write(tmp_path, {"__init__.py": '"""Root.\nMay import: vlblocks.high.b.\n"""\n', "high/__init__.py": '"""High layer.\nMay import: vlblocks.base.\n"""\n'})
    assert find_cycle(declared_graph(sources)) == ["vlblocks", "vlblocks.high", "vlblocks"]  # module entries count as their package
    _write(tmp_path, {"unsaid/__init__.py": '"""A package that does not say what it may import."""\n'})
    with pytest.raises(AssertionError, match="May import"):
        layering_violations(sources)
