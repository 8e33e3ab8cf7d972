"""Processes that train as one: under DDP and FSDP `gradient_sync(model, False)` keeps a
micro-batch's gradients in its own process (DDP's `no_sync`, FSDP's
`set_requires_gradient_sync`) and the step's last micro-batch averages everything accumulated;
every process takes the same decision on a step that is not finite. Two gloo processes on the CPU."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vlblocks.train.distributed import Processes, gradient_sync, wrap
from vlblocks.train.loop import NonFiniteGradients, Trainer


def accumulate(rank, strategy):
    """Two micro-batches in process `rank`: the gradients after the first (not synced) and after the second."""
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), strategy, Processes(rank=rank, world_size=2, control=dist.group.WORLD))
    inputs = torch.full((5, 4), float(rank + 1))  # each process its own micro-batches
    with gradient_sync(model, False):
        model(inputs).square().sum().backward()
    after_first = [None if p.grad is None else _whole(p.grad).tolist() for p in model.parameters()]
    with gradient_sync(model, True):
        model(2 * inputs).square().sum().backward()
    return after_first, [_whole(p.grad).tolist() for p in model.parameters()]


def _whole(gradient):
    """An FSDP gradient's whole tensor (a DTensor shard) or a plain one."""
    return gradient.full_tensor() if hasattr(gradient, "full_tensor") else gradient


def _local_gradients(rank):
    """What one process alone accumulates over its two micro-batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    inputs = torch.full((5, 4), float(rank + 1))
    model(inputs).square().sum().backward()
    first = [p.grad.clone() for p in model.parameters()]
    model(2 * inputs).square().sum().backward()
    return first, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_only_the_last_micro_batch_averages_the_gradients(strategy, in_two_gloo_processes):
    gathered = in_two_gloo_processes(accumulate, strategy)
    local = {rank: _local_gradients(rank) for rank in range(2)}
    for rank in range(2):
        after_first, after_step = gathered[rank]
        if strategy == "ddp":  # the first micro-batch's gradients stayed in their process
            for mine, alone in zip(after_first, local[rank][0]):
                torch.testing.assert_close(torch.tensor(mine), alone)
        else:  # FSDP keeps them unsharded and unreduced, outside the sharded .grad
            assert all(gradient is None for gradient in after_first)
        for mine, *alone in zip(after_step, local[0][1], local[1][1]):
            torch.testing.assert_close(torch.tensor(mine), (alone[0] + alone[1]) / 2)


def fp16_step_with_a_bad_loss_in_rank_one(rank, policy):
    """An fp16 step whose loss is infinite in process 1 only: what each process decides."""
    torch.manual_seed(0)
    model = wrap(nn.Linear(4, 2), "ddp", Processes(rank=rank, world_size=2, control=dist.group.WORLD))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    loss = model(torch.ones(3, 4)).sum() * (float("inf") if rank == 1 else 1.0)
    scaler.scale(loss).backward()  # DDP spreads the infinite gradients to process 0
    trainer = Trainer(nonfinite=policy)
    try:
        return trainer.optimizer_step(model, optimizer, scaler, loss.detach(), Processes(rank=rank, world_size=2, control=dist.group.WORLD))
    except NonFiniteGradients:
        return "stopped"


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_every_process_takes_the_same_decision_on_an_fp16_step(policy, in_two_gloo_processes):
    """Process 0's own loss is finite and its gradients are not, which alone would read as an
    overflow; the processes agree that a loss was not finite, so none waits for the others."""
    expected = "nonfinite" if policy == "skip" else "stopped"
    assert in_two_gloo_processes(fp16_step_with_a_bad_loss_in_rank_one, policy) == {0: expected, 1: expected}
