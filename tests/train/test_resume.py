"""Never lose work: a run killed (SIGKILL) or interrupted (SIGINT) at an arbitrary step and resumed
ends bit-identical to the run that was never stopped, with the same log; run folders are never
mixed; a non-finite loss stops the run by name."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vlblocks.app.run import train_from_recipe
from vlblocks.train.checkpoint import CheckpointError, step_folders
from vlblocks.train.loop import NonFiniteGradients

quiet = lambda *_: None  # noqa: E731
STEPS = 12


@pytest.fixture(scope="module")
def bindings(small_demo_bindings):
    """The small demo run with dropout on (so torch's generator matters), a checkpoint every 3
    steps, a log record every 2 and validation every 4, every linear layer on oneDNN (the path
    BASE-sized layers take on a CPU; the small ones here would otherwise stay on the BLAS)."""
    return [
        *small_demo_bindings, f"demo/Trainer.total_steps = {STEPS}", "demo/Trainer.checkpoint_every = 3", "demo/Trainer.log_every = 2",
        "demo/Trainer.eval_every = 4", "TransformerEncoder.dropout = 0.1", "TransformerEncoder.attention_dropout = 0.1",
        "demo/Trainer.onednn_min_multiply_adds = 0",
    ]


@pytest.fixture(scope="module")
def uninterrupted(demo_recipe, bindings, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_from_recipe(demo_recipe, bindings, out, echo=quiet)
    return out


def records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "samples_per_second")} for line in lines]


def final_weights(out):
    return load_file(str(step_folders(out / "checkpoints")[-1] / "model.safetensors"))


def assert_same_run(out, reference):
    assert records(out) == records(reference)
    weights, expected = final_weights(out), final_weights(reference)
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name


def start_training(demo_recipe, bindings, out):
    options = [item for binding in bindings for item in ("--bind", binding)]
    return subprocess.Popen(
        [sys.executable, "-m", "vlblocks", "train", demo_recipe, "--out", str(out), "--device", "cpu", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(condition, process, seconds=180):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"training ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)


def test_a_killed_run_resumes_bit_identical(demo_recipe, bindings, uninterrupted, tmp_path):
    process = start_training(demo_recipe, bindings, tmp_path)
    wait_for(lambda: (tmp_path / "checkpoints" / "step-0000006").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 6 <= int(step_folders(tmp_path / "checkpoints")[-1].name[5:]) < STEPS, "killed mid-run"
    lines = []
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=lines.append, resume=True)
    assert any(line.startswith("resumed from ") for line in lines)
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_checkpoints_the_last_step_and_resume_finishes_the_same_run(demo_recipe, bindings, uninterrupted, tmp_path, sent):
    process = start_training(demo_recipe, bindings, tmp_path)
    wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and '"step": 4' in (tmp_path / "metrics.jsonl").read_text(), process)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and f"{sent.name} after step" in stderr and "--resume" in stderr
    stopped_at = int(stderr.split(f"{sent.name} after step ")[1].split(":")[0])
    assert stopped_at < STEPS and step_folders(tmp_path / "checkpoints")[-1].name == f"step-{stopped_at:07d}"
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=quiet, resume=True)
    assert_same_run(tmp_path, uninterrupted)


def test_run_folders_are_never_mixed(demo_recipe, bindings, uninterrupted, tmp_path):
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume"):
        train_from_recipe(demo_recipe, bindings, uninterrupted, echo=quiet)
    with pytest.raises(CheckpointError, match=r"another recipe .*Trainer.lr_per_sample: 2.5e-05 -> 0.0001"):
        train_from_recipe(demo_recipe, [*bindings, "demo/Trainer.lr_per_sample = 1e-4"], uninterrupted, echo=quiet, resume=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train_from_recipe(demo_recipe, bindings, tmp_path / "empty", echo=quiet, resume=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 99, "loss": 0.0}\n')  # a run stopped before its first checkpoint
    train_from_recipe(demo_recipe, [*bindings, "demo/Trainer.total_steps = 2"], tmp_path, echo=quiet)
    assert [record["step"] for record in records(tmp_path)] == [2, 2]  # the training record and validation


def test_a_resumed_finished_run_only_evaluates(demo_recipe, bindings, uninterrupted):
    before = records(uninterrupted)
    lines = []
    validation = train_from_recipe(demo_recipe, bindings, uninterrupted, echo=lines.append, resume=True, precision="bf16")
    assert validation["mlm/count"] > 0 and records(uninterrupted) == before
    assert "the checkpoint was trained in fp32 and this run computes in bf16" in lines


def test_another_files_training_state_is_refused_before_anything_loads(demo_recipe, bindings, uninterrupted, tmp_path):
    """An optimiser's state saved where the training state belongs (a plausible mix-up) gives one
    line naming the file, and the run folder keeps its log."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for later in step_folders(run / "checkpoints")[1:]:
        shutil.rmtree(later)
    state_file = step_folders(run / "checkpoints")[-1] / "training_state.pt"
    torch.save(torch.load(state_file, weights_only=True)["optimizer"], state_file)
    log = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as raised:
        train_from_recipe(demo_recipe, bindings, run, echo=quiet, resume=True)
    message = str(raised.value)
    assert message.startswith(f"{state_file}: not the training state `vlblocks train` writes (no step, ") and "\n" not in message
    assert (run / "metrics.jsonl").read_text() == log


def test_a_multi_process_state_from_before_global_batch_sizes_is_refused(demo_recipe, bindings, uninterrupted, tmp_path):
    """Its batch sizes counted one process's samples: resuming would quietly train smaller global batches."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    state_file = step_folders(run / "checkpoints")[-1] / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    old = {key: value for key, value in state.items() if key not in ("precision", "batch_sizes")}
    torch.save({**old, "processes": state["processes"] * 2}, state_file)
    with pytest.raises(CheckpointError, match="written by 2 processes when batch sizes counted one process's samples"):
        train_from_recipe(demo_recipe, bindings, run, echo=quiet, resume=True)


def test_a_non_finite_loss_stops_the_run_or_skips_the_step(demo_recipe, bindings, tmp_path):
    huge = "image_text/MaskedLanguageModeling.weight = 1e38"  # x a loss of ~5: infinite in float32
    with pytest.raises(NonFiniteGradients, match="step 1: the loss or a gradient is not finite .*no checkpoint was written yet"):
        train_from_recipe(demo_recipe, [*bindings, huge], tmp_path / "stop", echo=quiet)
    lines = []
    train_from_recipe(demo_recipe, [*bindings, huge, "demo/Trainer.nonfinite = 'skip'", "demo/Trainer.total_steps = 2"], tmp_path / "skip", echo=lines.append)
    logged = records(tmp_path / "skip")
    assert [r["event"] for r in logged if "event" in r] == ["nonfinite_skipped"] * 2
    assert [r["skipped_steps"] for r in logged if "loss" in r] == [2]
    assert sum("NaN or infinite gradient" in line for line in lines) == 2
