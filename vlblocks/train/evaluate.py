"""Validation metrics: pre-training's seeded masking (with the ablations that show what each
modality adds) or a fine-tuning task's own."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.metrics import TaskMetrics
from vlblocks.models.task import Task
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.pretraining_task import PretrainingTask
from vlblocks.objectives.relation import CaptionImageRelation
from vlblocks.seeding import sample_seeds

EVALUATION_SEED = 1234  # the masking of a validation pass, when no run seed is given


@torch.no_grad()
def evaluate(
    task: PretrainingTask,
    dataset: Dataset,
    batch_size: int = 64,
    max_batches: Optional[int] = None,
    seed: int = EVALUATION_SEED,
    word_groups: Optional[dict[str, list[int]]] = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Masked-word and masked-region metrics averaged over the split. Sample i is masked from
    its own seed, (seed, i), so every pass masks the same tokens and regions of it, with its
    image blanked or not.

    `word_groups` maps a name to token ids; for each, the accuracy on masked tokens whose label
    is one of them is reported as 'mlm_<name>/accuracy' (with its count). `shard` = (rank,
    world): this process evaluates its share (`shard_indices`); the metrics sum over processes.
    """
    was_training = task.training
    task.eval()
    device = next(task.parameters()).device
    metrics = TaskMetrics(device)
    masked_lm = task.find(MaskedLanguageModeling)
    reported = {objective.name for objective in task.objectives.values() if objective.stream == "image_text" and not isinstance(objective, CaptionImageRelation)}
    groups = {name: torch.tensor(sorted(set(ids)), device=device) for name, ids in (word_groups or {}).items()}
    hits = TaskMetrics(device)
    indices = shard_indices(len(dataset), shard)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate_pretraining)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        rows = indices[index * batch_size : index * batch_size + batch.batch_size]
        batch, _ = task.prepare(batch.replace(sample_seeds=sample_seeds(seed, 0, rows)))
        batch = batch.to(device)
        output = task(batch)
        metrics.update({key: value for key, value in output.metrics.items() if key.split("/")[0] in reported})
        if masked_lm is not None and groups:
            labels = batch.mlm_labels[batch.mlm_positions[:, 0], batch.mlm_positions[:, 1]]
            correct = output.model_output.logits[masked_lm.name].argmax(-1) == labels
            for name, ids in groups.items():
                chosen = torch.isin(labels, ids)
                count = chosen.sum()
                hits.update({f"mlm_{name}/accuracy": (correct & chosen).sum() / count.clamp(min=1), f"mlm_{name}/count": count})
    task.train(was_training)
    return {**metrics.compute(), **hits.compute()}


@torch.no_grad()
def evaluate_task(
    task: Task, dataset: Dataset, collate, batch_size: int = 64, max_batches: Optional[int] = None, shard: tuple[int, int] = (0, 1)
) -> dict[str, float]:
    """A fine-tuning task's metrics averaged over the split (eval mode, no masking, in order;
    this process's `shard` of it)."""
    was_training = task.training
    task.eval()
    device = next(task.parameters()).device
    metrics = TaskMetrics(device)
    for index, batch in enumerate(DataLoader(Subset(dataset, shard_indices(len(dataset), shard)), batch_size=batch_size, collate_fn=collate)):
        if max_batches is not None and index >= max_batches:
            break
        batch, _ = task.prepare(batch)
        metrics.update(task(batch.to(device)).metrics)
    task.train(was_training)
    return metrics.compute()


def evaluate_run(
    task: Task, data: RunData, batch_size: int, max_batches: Optional[int], seed: int, shard: tuple[int, int] = (0, 1)
) -> dict[str, float]:
    """Validation metrics of a run: pre-training's seeded masking, or a fine-tuning task's own."""
    if isinstance(task, PretrainingTask):
        return evaluate(task, data.val, batch_size, max_batches, seed=seed, shard=shard)
    return evaluate_task(task, data.val, data.collate, batch_size, max_batches, shard)


def shard_indices(size: int, shard: tuple[int, int]) -> list[int]:
    """The sample indices process `rank` of `world` evaluates: every world-th, from an equal share
    of the split (up to world - 1 samples at its end are left out, so every process runs the same
    number of batches)."""
    rank, world = shard
    return list(range(rank, size - size % world if world > 1 else size, world))


def evaluate_with_ablations(
    task: Task, data: RunData, batch_size: int, max_batches: Optional[int], seed: int, ablations: bool = True
) -> dict[str, dict[str, float]]:
    """Validation metrics by variant: 'full' (with the data's word groups); for pre-training
    with `ablations`, also 'image_blanked' (every image blanked) and 'caption_dropped' (every
    caption dropped)."""
    if not isinstance(task, PretrainingTask):
        return {"full": evaluate_task(task, data.val, data.collate, batch_size, max_batches)}
    variants = {"full": data.val}
    if ablations:
        variants.update(image_blanked=data.val.ablated(blank_image=True), caption_dropped=data.val.ablated(drop_caption=True))
    return {name: evaluate(task, split, batch_size, max_batches, seed, data.word_groups) for name, split in variants.items()}
