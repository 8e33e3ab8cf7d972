"""The docs run: every Python block and every runnable shell block of README.md and docs/*.md,
in reading order, as a reader would run them, with tiny settings.

How a page is read:
- Pages run one after another (README.md, then docs/ in name order) in one working folder, so a
  page may use what an earlier one made (docs/training.md plots the README's demo run). HOME is a
  fresh folder, so the demo data is written to its default place, `~/.cache/vlblocks/demo`.
- A page's Python blocks share one namespace, as when pasted into one session in order.
- A `bash` block runs line by line (`\\` continues a line, `&&` chains, `#` starts a comment).
  `vlblocks ...` runs the CLI in this process; the setup commands of the README (a venv and the
  pip installs) are not re-run, but each install must be one that `.ci/run` does.
- A block that cannot run here says why on the line above it: `<!-- not run: REASON -->` (real
  data or weights at the reader's own paths, 8 GPUs, a synopsis). `<!-- file: NAME -->` above a
  block writes it into the working folder under NAME, so later commands can use it.

Tiny settings: every recipe any block parses gets `TINY` before its own bindings (1 layer,
32 wide, a 4-block ResNet, 48 + 16 demo scenes, 2 steps). A checkpoint a doc names by the recipe's last step
(`step-0000400`) is then the tiny run's last checkpoint, and the test checks that the step the
doc names is the recipe's real last step.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gin
import pytest
from typer.testing import CliRunner

from vlblocks.app.recipes import parse_recipe
from vlblocks.cli.app import app

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ELSEWHERE = {ROOT / "docs" / "python-api.md": "tests/docs/test_python_api.py runs its blocks as written and checks their output"}
LANGUAGES = {"bash", "python", "gin", "text"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- (not run|file): (.+?) -->\n\Z")
COMMAND = re.compile(r"^(vlblocks|python3?|torchrun|pip) ", re.M)
STEP = re.compile(r"(?P<run>.+)/checkpoints/step-(?P<step>\d{7})")
QUOTED_STEP = re.compile(r"([\"'])([^\"']+/checkpoints/step-\d{7})\1")
SETUP = (["python3", "-m", "venv"], [".", ".venv/bin/activate"])

TINY = [
    "HIDDEN_SIZE = 32", "NUM_HEADS = 2", "INTERMEDIATE_SIZE = 64", "NUM_LAYERS = 1",
    "TEXT_LAYERS = 1", "REGION_LAYERS = 1", "CROSS_LAYERS = 1",
    # the ResNet-101 of the end-to-end recipes as a 4-block ResNet, still giving 2048-d regions
    "ResNetC4Backbone.base_width = 4", "ResNetC4Backbone.stage_blocks = (1, 1, 1)",
    "DilatedC5RoIHead.num_blocks = 1", "DilatedC5RoIHead.in_channels = 64",
    "DemoScenes.train = 48", "DemoScenes.val = 16",
    "demo/Trainer.total_steps = 2", "demo/Trainer.batch_size = 4", "demo/Trainer.warmup_steps = 1",
    "demo/Trainer.log_every = 1", "demo/Trainer.eval_batches = 1",
]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    text: str
    not_run: str | None = None
    file: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of `page`, each with the marker on the line above it, if any."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        marker = MARKER.search(before)
        kind, value = (marker.group(1), marker.group(2)) if marker else (None, None)
        found.append(Block(page, before.count("\n") + 1, match.group(1), match.group(2),
                           value if kind == "not run" else None, value if kind == "file" else None))
    return found


def commands(script: str) -> Iterator[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, `&&` chains split,
    `~` expanded."""
    for line in script.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token != "&&":
                command.append(os.path.expanduser(token))
            elif command:
                yield command
                command = []


def ci_installs() -> set[tuple[str, ...]]:
    """What `.ci/run` pip-installs: each install's arguments, flags like --quiet left out."""
    installs = set()
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        tokens = shlex.split(line, comments=True)
        if "pip" in tokens and "install" in tokens:
            arguments = tokens[tokens.index("install") + 1 :]
            installs.add(tuple(a for a in arguments if a not in ("--quiet", "--upgrade")))
    return installs


def test_every_block_runs_or_says_why_not():
    """A new block cannot slip past the runner: each is labelled, and a command is in a bash block."""
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.language not in LANGUAGES:
                problems.append(f"{block.where}: label the block as one of {sorted(LANGUAGES)}, not {block.language!r}")
            elif block.language not in ("bash", "python") and COMMAND.search(block.text):
                problems.append(f"{block.where}: commands go in a bash block (with `<!-- not run: why -->` if they cannot run)")
            if block.not_run is not None and block.language not in ("bash", "python"):
                problems.append(f"{block.where}: only bash and python blocks run, so only they can be marked not run")
    assert not problems, "\n".join(problems)


class Reader:
    """Runs blocks in one working folder, remembering which recipe trained each run folder."""

    def __init__(self, installs: set[tuple[str, ...]]):
        self.installs = installs
        self.trained: dict[str, str] = {}
        self.tiny = True

    def with_tiny_settings(self, parse):
        def parse_with_tiny_settings(files, bindings, **options):
            return parse(files, [*(TINY if self.tiny else []), *bindings], **options)

        return parse_with_tiny_settings

    def run_block(self, block: Block, namespace: dict) -> None:
        if block.file:
            Path(block.file).write_text(block.text)
        if block.not_run is not None or block.language not in ("bash", "python"):
            return
        if block.language == "python":
            source = QUOTED_STEP.sub(lambda m: m.group(1) + self.checkpoint(m.group(2), block.where) + m.group(1), block.text)
            exec(compile(source, block.where, "exec"), namespace)
            return
        for command in commands(block.text):
            self.run_command(command, block.where)

    def run_command(self, command: list[str], where: str) -> None:
        if any(command[: len(setup)] == setup for setup in SETUP):
            return
        if command[:2] == ["pip", "install"]:
            assert tuple(command[2:]) in self.installs, f"{where}: `{shlex.join(command)}` is not an install .ci/run does"
            return
        assert command[0] == "vlblocks", (
            f"{where}: `{shlex.join(command)}`: only vlblocks commands run here; mark the block `<!-- not run: why -->`"
        )
        arguments = [self.checkpoint(argument, where) for argument in command[1:]]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, f"{where}: `{shlex.join(command)}` failed:\n{result.output}\n{result.exception!r}"
        if arguments[0] == "train" and "--out" in arguments:
            self.trained[arguments[arguments.index("--out") + 1]] = arguments[1]

    def checkpoint(self, argument: str, where: str) -> str:
        """A checkpoint the doc names by its recipe's last step, as the tiny run's last checkpoint."""
        match = STEP.fullmatch(argument)
        if not match or Path(argument).exists():
            return argument
        run = match.group("run")
        assert run in self.trained, f"{where}: {argument} is from a run no block before it trained"
        steps = self.schedule_steps(self.trained[run])
        assert int(match.group("step")) == steps, f"{where}: {argument}, but {self.trained[run]} trains {steps} steps"
        return str(sorted(Path(run, "checkpoints").glob("step-*"))[-1])

    def schedule_steps(self, recipe: str) -> int:
        """The real (not tiny) number of steps `recipe` trains on the demo data."""
        self.tiny = False
        try:
            parse_recipe(recipe)
        finally:
            self.tiny = True
        try:
            return gin.query_parameter("demo/Trainer.total_steps")
        except ValueError:
            return gin.query_parameter("Trainer.total_steps")


@pytest.mark.slow
def test_the_docs_run(tmp_path, monkeypatch):
    workspace = tmp_path / "reader"
    workspace.mkdir()
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reader = Reader(ci_installs())
    monkeypatch.setattr(gin, "parse_config_files_and_bindings", reader.with_tiny_settings(gin.parse_config_files_and_bindings))
    ran = 0
    for page in PAGES:
        if page in RUN_ELSEWHERE:
            continue
        namespace: dict = {}
        for block in blocks(page):
            reader.run_block(block, namespace)
            ran += block.not_run is None and block.language in ("bash", "python")
    assert ran >= 20
