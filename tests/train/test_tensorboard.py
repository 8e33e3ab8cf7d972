"""`Trainer.tensorboard`: the log also as TensorBoard scalars, purged past the checkpoint on resume."""

import json
import shutil

import pytest

pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from vlblocks.app.run import train_from_recipe  # noqa: E402

quiet = lambda *_: None  # noqa: E731


def scalars(out, tag):
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_the_log_is_also_written_for_tensorboard(demo_recipe, small_demo_bindings, tmp_path):
    bindings = [*small_demo_bindings, "demo/Trainer.tensorboard = True", "demo/Trainer.total_steps = 4", "demo/Trainer.log_every = 2",
                "demo/Trainer.checkpoint_every = 2", "demo/Trainer.eval_batches = 1"]
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=quiet)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {record["step"]: record["loss"] for record in records if "split" not in record}
    assert scalars(tmp_path, "train/loss") == pytest.approx(logged)
    assert set(scalars(tmp_path, "val/mlm/accuracy")) == {4}

    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004")
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=quiet, resume=True)
    assert scalars(tmp_path, "train/loss") == pytest.approx(logged), "the resumed steps replace the old ones"
