"""Several processes, one run: joining the group `torchrun` starts, wrapping the task for data
parallelism (DDP, or fully sharded with FSDP), and what the processes must agree on."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Processes:
    """This process among the processes of a run: rank 0 of 1 without `torchrun`.

    `control` is a gloo group in which the processes agree on host-side decisions (stopping on
    a signal, the outcome of claiming the run folder) without touching the device;
    `local_world_size` counts the processes on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Optional[Any] = None
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds in any process (every process must ask at the same point)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, group=self.control)
        return bool(value.item())  # a host tensor: nothing waits for a device

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, by rank, in every process."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, in every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)


def join_processes(device: Optional[torch.device] = None) -> Processes:
    """The processes of this run: under `torchrun` (WORLD_SIZE > 1 in the environment) join
    its group, NCCL when `device` is a GPU, gloo otherwise; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), control, local)


def process_device(device: torch.device, processes: Processes) -> torch.device:
    """A GPU run puts each process on its own GPU, `cuda:LOCAL_RANK`."""
    if device.type == "cuda" and processes.distributed:
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    return device


def leave_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(task: nn.Module, strategy: str, processes: Processes) -> nn.Module:
    """The task as the processes train it: itself alone; under several processes DDP (its
    gradients averaged after each backward) or FSDP (`fully_shard` on each Transformer layer and
    the whole task: parameters, gradients and optimiser state sharded across the processes)."""
    if not processes.distributed:
        return task
    if strategy == "ddp":
        device = next(task.parameters()).device
        return nn.parallel.DistributedDataParallel(task, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from vlblocks.blocks.encoder import TransformerLayer

    for module in task.modules():
        if isinstance(module, TransformerLayer):
            fully_shard(module)
    return fully_shard(task)


def unwrap(model: nn.Module) -> nn.Module:
    """The task inside a DDP wrapper (FSDP shards the task in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(values: Tensor, processes: Processes) -> Tensor:
    """`values` summed over the processes, on their device (nothing waits for it on the host)."""
    if processes.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager:
    """The context of a micro-batch's forward and backward: gradients are averaged across the
    processes only on the last micro-batch of a step (DDP's `no_sync`, FSDP's
    `set_requires_gradient_sync`)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: nn.Module, processes: Processes) -> Optional[dict[str, Tensor]]:
    """An FSDP model's whole weights, gathered to rank 0 (every process must call; the others
    get None)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model, options=_full_state_options())
    return weights if processes.is_main else None


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict[str, Any]:
    """The optimiser's state for a checkpoint. FSDP's is keyed by parameter name, gathered whole
    under several processes (every process must call) and renamed in a single one, so that any
    number of processes can load it."""
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    state = optimizer.state_dict()
    return _by_parameter_name(model, optimizer, state) if strategy == "fsdp" else state


def _by_parameter_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` with its parameter numbers (their order in the parameter groups)
    replaced by the parameters' names in `model`, as FSDP's gathered state names them."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    numbered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    return {
        "state": {numbered[number]: values for number, values in state["state"].items()},
        "param_groups": [{**group, "params": [numbered[number] for number in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], strategy: str) -> None:
    """Restore `optimizer_state`'s result: under several FSDP processes each takes its shard of the
    whole; otherwise the state's parameters are matched by their order, named or numbered."""
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def local_value(tensor: Tensor) -> Tensor:
    """A replicated DTensor's value (FSDP's gradient norm) as a plain tensor; others unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

