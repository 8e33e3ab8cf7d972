"""A training step (`Trainer.train_step`, the step `Trainer.fit` takes) waits for the device at
most once, in fp32 and in fp16 with its loss scaler (the finiteness check of the gradient norm):
metrics stay on the device, masked positions and packed lengths are decided on the host. Counted
on the CPU by intercepting every operation that needs a value or a shape from the device."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlblocks.app.run import build_run
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.metrics import TaskMetrics
from vlblocks.train.batches import BatchStream
from vlblocks.train.device import resolve_device
from vlblocks.train.precision import Precision

aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2, aten.unique_dim}
INDEXING = {aten.index, aten.index_put, aten.index_put_}
quiet = lambda *_: None  # noqa: E731


class DeviceWaits(TorchDispatchMode):
    """Counts the operations that read a value or a data-dependent shape back from the device:
    `.item()`, `bool()`, `int()`, `nonzero`, boolean-mask indexing, `tolist()`."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in VALUE_READS:
            self.waits.append(str(func))
        elif packet in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices):
                self.waits.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter.waits.append("tolist")
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc_info):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc_info)


def one_step(task, data, trainer, text_stream, precision="fp32"):
    """Host part (batches, masking) outside the count; then `Trainer.train_step`, as `Trainer.fit` takes it."""
    device = resolve_device("cpu")
    batches = BatchStream(data.train, 8, data.collate, seed=0)
    texts = BatchStream(data.text, 4, collate_text) if text_stream else None
    micro = [task.prepare(next(batches), next(texts) if texts is not None else None)]
    optimizer, _ = trainer.build_optimizer(task, 1e-4, trainer.schedule_for())
    metrics = TaskMetrics(device)
    chosen = Precision(precision, device)
    scaler = chosen.grad_scaler()
    task.train()
    optimizer.step = lambda: None  # AdamW's own step counters live on the host (see below)
    with DeviceWaits() as counter:
        assert trainer.train_step(task, task, micro, optimizer, scaler, metrics, chosen) is None
        optimizer.zero_grad(set_to_none=True)
    return counter.waits, metrics


def test_adamw_reads_only_its_host_step_counters():
    """Why `optimizer.step` is left out above: on the CPU every `.item()` looks the same, and
    AdamW reads its `step` counters with it; they are host tensors on a GPU run too."""
    parameter = torch.nn.Parameter(torch.zeros(3, device="cpu"))
    optimizer = torch.optim.AdamW([parameter])
    parameter.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.state[parameter]["step"].device.type == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_pretraining_step_waits_once(demo_recipe, small_demo_bindings, precision):
    """fp16's scaler unscales, checks and updates its scale on the device; the step reads only
    the norm (not `GradScaler.step`'s own check, nor the scale)."""
    task, data, trainer = build_run(demo_recipe, small_demo_bindings, echo=quiet)
    waits, metrics = one_step(task, data, trainer, text_stream=True, precision=precision)
    assert waits == ["aten._local_scalar_dense.default"], waits  # torch.isfinite(grad norm)
    assert {"mlm/accuracy", "mvrc/accuracy", "mlm_text/accuracy", "loss"} <= set(metrics.compute())


@pytest.mark.parametrize("task_name", ["vqa", "vcr", "refcoco"])
def test_a_fine_tuning_step_waits_once(task_name, demo_tasks):
    directory = demo_tasks[task_name].root.parent.parent
    train, val = {"vqa": (96, 32), "vcr": (96, 32), "refcoco": (800, 200)}[task_name]  # as tests/conftest.py writes them
    bindings = [
        "NUM_LAYERS = 2", "HIDDEN_SIZE = 32", "INTERMEDIATE_SIZE = 64", "FlattenRoIHead.out_channels = 32",
        f"APPEARANCE_SIZE = {48 if task_name == 'vqa' else 32}",
        f"DemoScenes.directory = '{directory}'", f"DemoScenes.train = {train}", f"DemoScenes.val = {val}",
    ]
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo", f"finetune_{task_name}.gin")
    task, data, trainer = build_run(recipe, bindings, echo=quiet)
    waits, metrics = one_step(task, data, trainer, text_stream=False)
    assert waits == ["aten._local_scalar_dense.default"], waits
    assert f"{task_name}/accuracy" in metrics.compute()
