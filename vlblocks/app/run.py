"""`vlblocks train` and `vlblocks eval`: recipe → data, task, trainer → results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import gin
import torch

from vlblocks.app.backbone_weights import start_backbones
from vlblocks.app.files import write_text_atomically
from vlblocks.app.recipes import RecipeError, build_from_recipe, describe_files, parse_recipe
from vlblocks.app.registry import configured, experiment
from vlblocks.contracts import Echo
from vlblocks.data.datasets.run_data import RunData
from vlblocks.models.interface import VLModel
from vlblocks.models.task import Task
from vlblocks.train.checkpoint import CheckpointError, load_checkpoint, load_pretrained
from vlblocks.train.device import resolve_device
from vlblocks.train.distributed import Processes, join_processes, leave_processes, process_device
from vlblocks.train.evaluate import evaluate_with_ablations
from vlblocks.train.loop import Trainer, reads_text_stream
from vlblocks.train.run_folder import claim_run_folder

DEMO_SCOPE = "demo"  # the gin scope of the Trainer on the embedded demo data


def build_run(
    recipe: str | Path, bindings: Sequence[str] = (), echo: Echo = print, refuse_random_backbone: bool = False
) -> tuple[Task, RunData, Trainer]:
    """Parse the recipe and build (task, data, trainer): the data first, then the trainer (in
    the gin scope `demo` on the demo data, so its `demo/Trainer.*` schedule applies), then the
    task seeded by the trainer, its ResNet from `EndToEndRegionFeatures.backbone_checkpoint`,
    started from the pre-trained checkpoint when the recipe names one, and fitted to the data
    (vocabulary, answer list). `refuse_random_backbone` (a training run that does not resume):
    a ResNet left random without opting in is a `RecipeError` (see `start_backbones`)."""
    echo(describe_files(parse_recipe(recipe, bindings)))
    build_task, build_data, pretrained, segment_b_from_a = build_from_recipe(recipe, experiment, echo)
    data = build_from_recipe(recipe, build_data, echo)
    with gin.config_scope(DEMO_SCOPE if data.is_demo else None):
        trainer = build_from_recipe(recipe, configured("Trainer"), echo)
    torch.manual_seed(trainer.seed)  # the model's initialisation follows the recipe's seed
    task = build_from_recipe(recipe, build_task, echo)
    start_backbones(task, pretrained, data.is_demo, refuse_random_backbone, echo)
    if pretrained is not None:
        echo(load_pretrained(task, pretrained, task.pretrained_prefixes))
    if segment_b_from_a:
        if not isinstance(getattr(task, "vlbert", None), VLModel):
            raise RecipeError(f"experiment.segment_b_from_a copies segment row A of the task's model to row B, but {type(task).__name__} has no `vlbert`")
        with torch.no_grad():
            segments = task.vlbert.segment_embeddings.weight
            segments[1] = segments[0]
    task.fit_to_data(data, echo)
    return task, data, trainer


def train_from_recipe(
    recipe: str | Path,
    bindings: Sequence[str],
    out_dir: str | Path,
    max_steps: Optional[int] = None,
    echo: Echo = print,
    device: str | torch.device = "auto",
    precision: Optional[str] = None,
    resume: bool = False,
) -> dict[str, float]:
    """Build the run on `device`, claim `out_dir` (see `claim_run_folder`: a new run writes
    `recipe.gin` and a fresh log, `resume` continues from the latest checkpoint) and train;
    returns the last validation metrics. `precision` overrides the recipe's `Trainer.precision`.

    Under `torchrun` each process joins the run's group and trains its share; rank 0 builds the
    data first (the others then read what it wrote), claims the folder, prints and writes.

    Raises:
        CheckpointError: `out_dir` already holds another run, or there is nothing to resume.
        TrainingStopped: interrupted (a checkpoint was written), or a non-finite loss.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    processes = join_processes(device)
    try:
        device = process_device(device, processes)
        echo = echo if processes.is_main else _quiet
        task, data, trainer = _build_in_turn(recipe, bindings, echo, processes, refuse_random_backbone=not resume)
        try:  # before the folder is claimed, so a refused run changes nothing in it
            trainer.check_runnable(processes.world_size, reads_text_stream(task, data))
        except ValueError as error:
            raise RecipeError(f"{recipe}: {error}") from None
        recipe_text = gin.config_str()
        claimed = processes.share(_claim(out_dir, recipe_text, resume) if processes.is_main else None)
        if isinstance(claimed, CheckpointError):
            raise claimed
        task.to(device)
        chosen = trainer.resolve_precision(device, echo, precision)
        return trainer.fit(task, data, out_dir, recipe_text, max_steps, echo, chosen, claimed, processes)
    finally:
        leave_processes(processes)


def _quiet(line: str) -> None:
    """The echo of the processes other than rank 0."""


def _build_in_turn(
    recipe: str | Path, bindings: Sequence[str], echo: Echo, processes: Processes, refuse_random_backbone: bool = False
) -> tuple[Task, RunData, Trainer]:
    """`build_run` in every process, rank 0 first: it writes the demo data the others then read."""
    if processes.is_main:
        built = build_run(recipe, bindings, echo, refuse_random_backbone)
    processes.barrier()
    if not processes.is_main:
        built = build_run(recipe, bindings, echo, refuse_random_backbone)
    return built


def _claim(out_dir: str | Path, recipe_text: str, resume: bool) -> Optional[Path] | CheckpointError:
    """`claim_run_folder`'s checkpoint, or its error (handed to every process to raise)."""
    try:
        return claim_run_folder(out_dir, recipe_text, resume)
    except CheckpointError as error:
        return error


def eval_from_recipe(
    recipe: str | Path,
    bindings: Sequence[str],
    checkpoint: str | Path,
    batch_size: int = 64,
    max_batches: Optional[int] = None,
    ablations: bool = True,
    echo: Echo = print,
    device: str | torch.device = "auto",
    precision: Optional[str] = None,
) -> dict[str, dict[str, float]]:
    """Validation metrics of a checkpoint on `device`, by variant ('full', and for pre-training
    with `ablations` 'image_blanked' and 'caption_dropped')."""
    device = resolve_device(device) if isinstance(device, str) else device
    task, data, trainer = build_run(recipe, bindings, echo)
    load_checkpoint(task, checkpoint, gin.config_str())
    task.to(device)
    chosen = trainer.resolve_precision(device, echo, precision, compiled=False)  # evaluation runs eagerly
    with chosen.autocast():
        return evaluate_with_ablations(task, data, batch_size, max_batches, trainer.seed, ablations)


VARIANT_HEADINGS = {"full": "with image", "image_blanked": "image blanked", "caption_dropped": "caption dropped"}
RESULTS_FILE = "eval.json"  # beside a checkpoint folder's weights


def result_columns(results: dict) -> dict[str, dict[str, float]]:
    """Results by variant: `eval_from_recipe`'s {variant: {metric: value}} as it is, a flat
    {metric: value} (training's validation, VCR's joint accuracy) as the one column 'full'."""
    if results and all(isinstance(value, dict) for value in results.values()):
        return results
    return {"full": results}


def format_value(metric: str, value: Optional[float]) -> str:
    """A count as an integer, any other metric with 4 decimals, '-' where a column lacks it."""
    if value is None:
        return "-"
    if metric == "count" or metric.endswith("/count"):
        return f"{round(value):d}"
    return f"{value:.4f}"


def format_results(results: dict) -> str:
    """Results as a text table, one row per metric (sorted) and one column per variant: 'with
    image', 'image blanked', 'caption dropped' for pre-training with ablations, else 'full'."""
    columns = result_columns(results)
    headings = [VARIANT_HEADINGS.get(name, name) if len(columns) > 1 else name for name in columns]
    metrics = sorted({metric for values in columns.values() for metric in values})
    rows = [["metric", *headings]]
    rows += [[metric, *(format_value(metric, values.get(metric)) for values in columns.values())] for metric in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headings) + 1)]
    lines = ["  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))]) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def results_file(checkpoint: str | Path, json_path: Optional[str | Path] = None) -> Path:
    """Where `vlblocks eval` writes its JSON: `json_path`, else CHECKPOINT/eval.json for a
    checkpoint folder or NAME.eval.json beside a weights file.

    Raises:
        OSError: one line naming the path, when it is a folder or its folder does not exist
            (checked before evaluating, so no time is spent on results that cannot be kept).
    """
    checkpoint = Path(checkpoint)
    if json_path is not None:
        path = Path(json_path)
    elif checkpoint.is_dir():
        path = checkpoint / RESULTS_FILE
    else:
        path = checkpoint.with_name(f"{checkpoint.stem}.{RESULTS_FILE}")
    if path.is_dir():
        raise OSError(f"{path}: cannot write the results there (a folder)")
    if not path.parent.is_dir():
        raise OSError(f"{path}: cannot write the results there ({path.parent} is not an existing folder)")
    return path


def write_results(results: dict, path: str | Path) -> Path:
    """Write `results` as indented JSON with sorted keys, atomically: to a temporary file in the
    same folder, then renamed over `path`, so a reader never sees half a file and a failed write
    leaves what was there.

    Raises:
        OSError: one line naming the path and why it cannot be written.
    """
    path = Path(path)
    try:
        return write_text_atomically(json.dumps(results, indent=2, sort_keys=True) + "\n", path)
    except OSError as error:
        raise OSError(f"{path}: cannot write the results ({error.strerror or error})") from None
