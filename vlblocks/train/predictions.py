"""A task's outputs over a whole dataset, in the dataset's order: what prediction files and the
per-question VCR picks are made from."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlblocks.batch import VLBatch
from vlblocks.models.task import Task

Pick = Callable[[VLBatch, Tensor], Tensor]


@torch.no_grad()
def dataset_outputs(task: Task, dataset: Dataset, collate: Callable, batch_size: int = 16, pick: Optional[Pick] = None) -> Tensor:
    """The task's `model_output` for every item of `dataset`, in order, on the CPU.

    The task runs in eval mode (restored afterwards) on the device of its parameters, in batches
    of `batch_size` items, never shuffled.

    Args:
        pick: (batch, model_output) → what to keep of each batch, [items, ...] with the same
            trailing shape in every batch (e.g. the argmax region when batches differ in their
            region count); None keeps `model_output` itself.

    Returns:
        [len(dataset), ...] the kept outputs, concatenated.
    """
    was_training = task.training
    task.eval()
    device = next(task.parameters()).device
    kept = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            batch, _ = task.prepare(batch)
            batch = batch.to(device)
            output = task(batch).model_output
            kept.append((output if pick is None else pick(batch, output)).detach().cpu())
    finally:
        task.train(was_training)
    if not kept:
        raise ValueError("the dataset is empty: there is nothing to predict")
    return torch.cat(kept)
