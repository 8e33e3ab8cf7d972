"""torchrun on the CPU with the gloo backend: the same recipe (a global batch of 2b) trains to the
same parameters on 2 processes (b each) as on 1, and as 1 process x batch b x 2 accumulation
steps (DDP and FSDP, with `Trainer.loss_normalization = 'step'`); rank 0 alone writes; a
2-process run resumes exactly from its checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from vlblocks.app.run import train_from_recipe
from vlblocks.train.distributed import Processes, join_processes, process_device

pytestmark = pytest.mark.slow  # starts torchrun
STEPS = 4
quiet = lambda *_: None  # noqa: E731


def schedule(batch, text_batch, accumulation=1):
    """The test schedule, with `batch` image-text and `text_batch` text-only samples a micro-batch over all processes."""
    return [f"demo/Trainer.total_steps = {STEPS}", "demo/Trainer.warmup_steps = 1", "demo/Trainer.log_every = 1", "demo/Trainer.checkpoint_every = 2",
            f"demo/Trainer.batch_size = {batch}", f"demo/Trainer.text_batch_size = {text_batch}", f"demo/Trainer.accumulation_steps = {accumulation}",
            "demo/Trainer.loss_normalization = 'step'"]  # the same updates however the global batch is split


def torchrun(demo_recipe, bindings, out, *extra):
    options = [item for binding in bindings for item in ("--bind", binding)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlblocks", "train", demo_recipe, "--out", str(out), "--device", "cpu", *options, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(out, step=STEPS):
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record and "split" not in record]


def assert_close_weights(out, reference):
    mine, theirs = weights(out), weights(reference)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=2e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process_double_batch(demo_recipe, small_demo_bindings, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train_from_recipe(demo_recipe, [*small_demo_bindings, *schedule(16, 8)], out, echo=quiet)
    return out


@pytest.fixture(scope="module")
def two_processes(demo_recipe, small_demo_bindings, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    result = torchrun(demo_recipe, [*small_demo_bindings, *schedule(16, 8)], out)
    return out, result


def test_two_processes_train_as_one_process_with_the_whole_batch(two_processes, one_process_double_batch):
    out, result = two_processes
    assert_close_weights(out, one_process_double_batch)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one_process_double_batch)), rtol=1e-5, atol=1e-6)
    assert "(8 + 4 in each of 2 processes); lr = 2.5e-05 per sample x 24 = 0.0006" in result.stdout, "each process takes half; the LR counts the whole step"


def test_accumulation_trains_as_one_bigger_batch(demo_recipe, small_demo_bindings, one_process_double_batch, tmp_path):
    train_from_recipe(demo_recipe, [*small_demo_bindings, *schedule(8, 4, accumulation=2)], tmp_path, echo=quiet)
    assert_close_weights(tmp_path, one_process_double_batch)


def test_rank_zero_alone_writes(two_processes):
    out, result = two_processes
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.gin"]
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-0000002", f"step-{STEPS:07d}"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4, 4], "one record per step (and validation), not one per process"
    assert result.stdout.count("schedule:") == 1


def test_fsdp_trains_as_ddp(demo_recipe, small_demo_bindings, one_process_double_batch, tmp_path):
    torchrun(demo_recipe, [*small_demo_bindings, *schedule(16, 8), "demo/Trainer.distributed = 'fsdp'"], tmp_path)
    assert_close_weights(tmp_path, one_process_double_batch)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_on_the_onednn_path(demo_recipe, small_demo_bindings, strategy, tmp_path):
    """Every linear layer on oneDNN (`Trainer.onednn_min_multiply_adds = 0`; BASE-sized layers take
    that path on a CPU, these small ones would not): FSDP's unsharded parameters and DDP's
    gradient hooks see what they see on the BLAS path."""
    onednn = [*small_demo_bindings, "demo/Trainer.onednn_min_multiply_adds = 0"]
    train_from_recipe(demo_recipe, [*onednn, *schedule(16, 8)], tmp_path / "one", echo=quiet)
    result = torchrun(demo_recipe, [*onednn, *schedule(16, 8), f"demo/Trainer.distributed = '{strategy}'"], tmp_path / "two")
    assert "large linear layers on oneDNN" in result.stdout
    assert_close_weights(tmp_path / "two", tmp_path / "one")


def test_two_processes_resume_exactly(demo_recipe, small_demo_bindings, two_processes, tmp_path):
    """The checkpoint at step 2 of the two-process run, resumed by two processes, ends where
    the run ended (its later checkpoint and log records removed first)."""
    out, _ = two_processes
    shutil.copytree(out, tmp_path / "run")
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:07d}")
    torchrun(demo_recipe, [*small_demo_bindings, *schedule(16, 8)], run, "--resume")
    assert_close_weights(run, out)
    assert losses(run) == losses(out)


def test_one_process_continues_a_two_process_run(demo_recipe, small_demo_bindings, two_processes, tmp_path):
    """The batch sizes count every process, so one process can take over a two-process run at its
    step-2 checkpoint: the same global batches and learning rate. With no dropout in the demo, it
    ends at the two-process run's weights (float tolerance) and says what it could not restore."""
    out, _ = two_processes
    shutil.copytree(out, tmp_path / "run")
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:07d}")
    lines = []
    train_from_recipe(demo_recipe, [*small_demo_bindings, *schedule(16, 8)], run, echo=lines.append, resume=True)
    assert any("written by 2 processes and this run has 1" in line for line in lines), lines
    assert_close_weights(run, out)
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(out)), rtol=1e-5, atol=1e-6)


def test_two_fsdp_processes_continue_a_one_process_run(demo_recipe, small_demo_bindings, one_process_double_batch, tmp_path):
    """The other way, sharded: FSDP's optimiser state is saved by parameter name in one process
    too, so two processes can each take their shard of it."""
    fsdp = [*small_demo_bindings, *schedule(16, 8), "demo/Trainer.distributed = 'fsdp'"]
    train_from_recipe(demo_recipe, fsdp, tmp_path, echo=quiet)
    shutil.rmtree(tmp_path / "checkpoints" / f"step-{STEPS:07d}")
    result = torchrun(demo_recipe, fsdp, tmp_path, "--resume")
    assert "written by 1 process and this run has 2" in result.stdout
    assert_close_weights(tmp_path, one_process_double_batch)


def test_gpu_processes_take_their_own_gpu_and_join_with_nccl(monkeypatch):
    """The CUDA branch of joining, on the CPU: each process on cuda:LOCAL_RANK, NCCL for the
    gradients and a gloo group for host-side agreement."""
    chosen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.setdefault("device", device))
    assert process_device(torch.device("cuda"), Processes(rank=3, world_size=4, local_rank=1)) == torch.device("cuda", 1)
    assert chosen["device"] == torch.device("cuda", 1)
    assert process_device(torch.device("cpu"), Processes(rank=1, world_size=2, local_rank=1)) == torch.device("cpu")
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: chosen.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_backend", lambda: chosen["backend"])
    monkeypatch.setattr(dist, "new_group", lambda backend: f"{backend} group")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    processes = join_processes(torch.device("cuda"))
    assert chosen["backend"] == "nccl" and processes.control == "gloo group"
    assert (processes.rank, processes.world_size, processes.local_rank, processes.local_world_size) == (1, 2, 1, 2)
