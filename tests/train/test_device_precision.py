"""Devices and mixed precision, on the CPU: the CUDA-only branches are tested through the
decisions they rest on (device names, pinned memory), autocast runs for real in bf16 and fp16."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.batch import VLBatch
from vlblocks.blocks.encoder import MultiHeadAttention
from vlblocks.blocks.normalization import LayerNorm
from vlblocks.cli.app import app
from vlblocks.train.device import default_workers, pins_memory, resolve_device
from vlblocks.train.loop import NonFiniteGradients
from vlblocks.train.precision import Precision, resolve_precision

CPU = torch.device("cpu")
quiet = lambda *_: None  # noqa: E731


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_devices_resolve_or_name_what_is_missing():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")


def test_batches_for_a_gpu_are_pinned_and_every_tensor_field_is_mapped(monkeypatch):
    assert pins_memory(torch.device("cuda:1")) and not pins_memory(CPU) and not pins_memory(torch.device("mps"))
    batch = VLBatch(
        text_ids=torch.ones(2, 3, dtype=torch.long), segment_ids=torch.zeros(2, 3, dtype=torch.long),
        text_mask=torch.ones(2, 3, dtype=torch.bool), boxes=torch.zeros(2, 1, 4), region_mask=torch.ones(2, 1, dtype=torch.bool),
        image_sizes=torch.ones(2, 2), mlm_labels=torch.full((2, 3), -1),
    )
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor.shape) or tensor.clone())
    copy = batch.pin_memory()
    assert len(pinned) == 7 and copy.images is None and torch.equal(copy.mlm_labels, batch.mlm_labels)
    assert batch.map_tensors(lambda tensor: tensor.double()).boxes.dtype == torch.float64


def test_layer_norm_and_attention_probabilities_stay_float32_under_autocast():
    norm = LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps), atol=0, rtol=0)
    assert norm.double()(x.double()).dtype == torch.float64
    norm.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = x.to(torch.bfloat16)
        out = norm(low)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(low.float(), (8,), norm.weight, norm.bias, norm.eps))
        _, probabilities = MultiHeadAttention(8, 2, 0.0)(x, torch.ones(2, 3, dtype=torch.bool), output_attentions=True)
    assert probabilities.dtype == torch.float32


def test_precision_autocasts_matmuls_and_only_fp16_scales_the_loss():
    x = torch.randn(4, 4)
    assert (Precision("fp32", CPU).dtype, Precision("fp32", CPU).grad_scaler()) == (None, None)
    with Precision("fp32", CPU).autocast():
        assert (x @ x).dtype == torch.float32
    with Precision("bf16", CPU).autocast():
        assert (x @ x).dtype == torch.bfloat16
    assert Precision("bf16", CPU).grad_scaler() is None
    assert isinstance(Precision("fp16", CPU).grad_scaler(), torch.amp.GradScaler)
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        Precision("fp8", CPU)


def test_a_recipes_fp16_becomes_fp32_on_a_cpu_but_an_explicit_choice_is_kept():
    lines = []
    assert resolve_precision("fp16", CPU, from_recipe=True, echo=lines.append).name == "fp32"
    assert "for GPUs" in lines[0]
    assert resolve_precision("fp16", CPU, from_recipe=False).name == "fp16"
    assert resolve_precision("fp16", torch.device("cuda"), from_recipe=True).name == "fp16"
    assert resolve_precision("bf16", CPU, from_recipe=True).name == "bf16"


def test_fp16_skips_and_logs_steps_whose_gradients_overflow(demo_recipe, small_demo_bindings, tmp_path):
    """A loss weight of 1e30 overflows every float16 gradient: each step is skipped (the
    parameters keep their initial values), logged, and the loss scale halves."""
    bindings = [*small_demo_bindings, "demo/Trainer.total_steps = 3", "demo/Trainer.log_every = 1", "image_text/MaskedLanguageModeling.weight = 1e30"]
    initial, _, _ = build_run(demo_recipe, bindings, echo=quiet)
    lines = []
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=lines.append, device="cpu", precision="fp16")
    events = [r for r in read_log(tmp_path / "metrics.jsonl") if r.get("event") == "overflow_skipped"]
    assert [e["step"] for e in events] == [1, 2, 3] and events[0]["loss_scale"] == 2.0**15 and events[2]["loss_scale"] == 2.0**13
    assert sum("gradients overflowed, step skipped" in line for line in lines) == 3
    trained, _, _ = build_run(demo_recipe, [*bindings, f"experiment.pretrained = '{tmp_path}/checkpoints/step-0000003'"], echo=quiet)
    for (name, before), (_, after) in zip(initial.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(before, after), name


def test_fp16_stops_or_skips_at_a_loss_that_is_not_finite(demo_recipe, small_demo_bindings, tmp_path):
    """A loss weight of 1e38 makes the float32 loss itself infinite: no loss scale can fix that,
    so it is no overflow to skip but the run's `Trainer.nonfinite` policy."""
    bindings = [*small_demo_bindings, "demo/Trainer.total_steps = 2", "demo/Trainer.log_every = 1", "image_text/MaskedLanguageModeling.weight = 1e38"]
    with pytest.raises(NonFiniteGradients, match="step 1: the loss or a gradient is not finite"):
        train_from_recipe(demo_recipe, bindings, tmp_path / "stop", echo=quiet, device="cpu", precision="fp16")
    train_from_recipe(demo_recipe, [*bindings, "demo/Trainer.nonfinite = 'skip'"], tmp_path / "skip", echo=quiet, device="cpu", precision="fp16")
    assert [r["event"] for r in read_log(tmp_path / "skip" / "metrics.jsonl") if "event" in r] == ["nonfinite_skipped"] * 2


def test_bf16_training_keeps_float32_weights_and_checkpoints(demo_recipe, small_demo_bindings, tmp_path):
    bindings = [*small_demo_bindings, "demo/Trainer.total_steps = 4", "demo/Trainer.log_every = 2", "demo/Trainer.eval_batches = 1"]
    lines = []
    validation = train_from_recipe(demo_recipe, bindings, tmp_path, echo=lines.append, device="cpu", precision="bf16")
    assert "computing on cpu in bf16" in lines
    records = [r for r in read_log(tmp_path / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in records] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert validation["mlm/count"] > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoints" / "step-0000004" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float32}


def test_a_recipe_asking_for_fp16_trains_in_fp32_on_the_cpu(demo_recipe, small_demo_bindings, tmp_path):
    lines = []
    train_from_recipe(demo_recipe, [*small_demo_bindings, "demo/Trainer.total_steps = 1", "demo/Trainer.precision = 'fp16'"], tmp_path,
                      echo=lines.append, device="cpu")
    assert any(line.startswith("computing on cpu in fp32") for line in lines) and any("fp16, which is for GPUs" in line for line in lines)


def test_the_command_line_refuses_devices_and_precisions_it_cannot_use(demo_recipe, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", demo_recipe, "--out", str(tmp_path), "--precision", "fp8"])
    assert result.exit_code == 2 and "fp32, bf16, fp16" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["train", demo_recipe, "--out", str(tmp_path), "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not (tmp_path / "metrics.jsonl").exists()


def test_python_dash_m_vlblocks_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "vlblocks", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--precision" in result.stdout and "--device" in result.stdout


def test_data_workers_by_default_only_where_they_overlap_an_accelerator():
    assert default_workers(torch.device("cpu"), cores=64) == 0
    assert default_workers(torch.device("cuda", 1), processes_on_machine=2, cores=16) == 7
    assert default_workers(torch.device("cuda"), cores=64) == 8
    assert default_workers(torch.device("cuda"), processes_on_machine=8, cores=8) == 0
