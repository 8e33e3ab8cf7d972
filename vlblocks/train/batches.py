"""Training batches as an endless, resumable stream: a checkpoint records where the stream is, and
a resumed run continues with the very batch that came next. Every batch carries its samples'
seeds, functions of (seed, epoch, sample index) only."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.sampling import LengthBucketSampler
from vlblocks.seeding import sample_seeds
from vlblocks.train.lengths import sample_lengths


def _share_of(batch: list, rank: int, share: int) -> list:
    """Process `rank`'s `share` consecutive samples of a global batch."""
    return batch[rank * share : (rank + 1) * share]


def _new_skips(dataset: Any, before: int) -> list[str]:
    """The bad records `dataset` skipped (`skip_bad_records`) since it had skipped `before`."""
    skipped = getattr(dataset, "skipped", None)
    return list(skipped[before:]) if skipped is not None else []


class _Indexed(Dataset):
    """The samples of `dataset`, read by (index, epoch) keys, with their index and the bad records
    skipped to produce them (counted where the sample was read, in a worker process or not).
    A dataset with random augmentation offers `item_in_epoch(index, epoch)` and draws anew each
    epoch; any other is read as `dataset[index]`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any, list[str]]:
        index, epoch = key
        before = len(getattr(self.dataset, "skipped", ()))
        item_in_epoch = getattr(self.dataset, "item_in_epoch", None)
        sample = item_in_epoch(index, epoch) if item_in_epoch is not None else self.dataset[index]
        return index, sample, _new_skips(self.dataset, before)


class _CollateIndexed:
    """`collate` over `_Indexed` items → ([B] indices, batch, skipped records); picklable for workers."""

    def __init__(self, collate: Callable[[list], VLBatch]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any, list[str]]]) -> tuple[Tensor, VLBatch, list[str]]:
        skipped = [message for _, _, messages in items for message in messages]
        return torch.tensor([index for index, _, _ in items]), self.collate([sample for _, sample, _ in items]), skipped


class _CollateRankShare:
    """A stream's global batch → this process's share, collated: ([b] stream positions, batch, [])."""

    def __init__(self, collate: Callable[[list], VLBatch], rank: int, share: int) -> None:
        self.collate = collate
        self.rank = rank
        self.share = share

    def __call__(self, chunks: list[Any]) -> tuple[Tensor, VLBatch, list[str]]:
        mine = _share_of(chunks, self.rank, self.share)
        return torch.tensor([chunk.position for chunk in mine]), self.collate(mine), []


class _EpochBatches(Sampler[list[tuple[int, int]]]):
    """One epoch of this process's batches each time it is iterated: the global batches of
    `order` (drawn when iteration starts), each cut to process `rank`'s `share`, after the first
    `skip` of them (their indices are drawn, not loaded), as (index, `epoch`) keys. `skip`
    applies to the next epoch only."""

    def __init__(self, order: Sampler[list[int]], rank: int, share: int) -> None:
        self.order = order
        self.rank = rank
        self.share = share
        self.skip = 0
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self.skip, epoch = self.skip, 0, self.epoch
        for number, batch in enumerate(self.order):
            if number >= skip:
                yield [(index, epoch) for index in _share_of(batch, self.rank, self.share)]

    def __len__(self) -> int:
        return len(self.order)


class BatchStream:
    """Batches of a dataset forever, epoch after epoch, with a position a checkpoint can hold.

    A map-style dataset is read in a new order each epoch, drawn from a generator seeded with
    `seed`: shuffled and cut into full batches (the last partial one is dropped), or grouped by
    length (`length_bucketing`, `LengthBucketSampler`). `state_dict` holds that generator's state
    at the start of the current epoch and the batches taken since; `load_state_dict` replays
    the epoch's order and skips those batches by index, without loading them. An iterable
    dataset is read in order, by at most one worker process (each worker would read all of it:
    a dataset that shards itself between workers is not one `BatchStream` can assume); a
    resumed stream reads past the batches already taken. Each batch comes with `sample_seeds`
    set from `seed`, its epoch and the indices of its samples (for the text stream, their
    positions in it).

    One `DataLoader` serves the whole run; with `num_workers`, its worker processes persist from
    epoch to epoch and each keeps `prefetch_factor` batches ready. The order does not depend on
    the workers. Bad records skipped while reading (`skip_bad_records`) are counted in
    `skipped`, in worker processes too.

    With several processes (`world_size`), every process draws the same global batches of
    `batch_size x world_size` samples and takes its own `batch_size` of each, so every sample is
    seen once per epoch, and the samples of a step are those one process with the whole global
    batch would see.

    Args:
        dataset: samples that `collate` turns into a `VLBatch`.
        batch_size: samples per batch of this process.
        collate: list of samples → `VLBatch`.
        seed: seeds the order of a map-style dataset.
        length_bucketing: batch samples of similar `dataset.length(i)` together; the lengths
            are `lengths` when given (`run_lengths`), else read once, here, in `num_workers`
            worker processes (`sample_lengths`).
        lengths: [len(dataset)] `dataset.length(i)`, already read.
        num_workers, pin_memory, prefetch_factor: as for `DataLoader`.
        rank, world_size: this process and how many there are.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate: Callable[[list], VLBatch],
        seed: int = 0,
        length_bucketing: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch_factor: int = 2,
        lengths: Optional[Sequence[int]] = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.ordered = isinstance(dataset, IterableDataset)
        global_batch = batch_size * world_size
        self.batches: Optional[_EpochBatches] = None
        if self.ordered:
            self.generator = torch.Generator().manual_seed(seed)  # unused: the corpus has its order
            dataset_view, collate_view, sampling = dataset, _CollateRankShare(collate, rank, batch_size), dict(batch_size=global_batch)
        else:
            if length_bucketing:
                if not hasattr(dataset, "length"):
                    raise ValueError(f"Trainer.length_bucketing needs a dataset with length(index); {type(dataset).__name__} has none")
                lengths = sample_lengths(dataset, num_workers) if lengths is None else lengths
                order: Sampler[list[int]] = LengthBucketSampler(lengths, global_batch, seed=seed)
                self.generator = order.generator
            else:
                self.generator = torch.Generator().manual_seed(seed)
                order = BatchSampler(RandomSampler(dataset, generator=self.generator), global_batch, drop_last=True)
            self.batches = _EpochBatches(order, rank, batch_size)
            dataset_view, collate_view, sampling = _Indexed(dataset), _CollateIndexed(collate), dict(batch_sampler=self.batches)
        if self.ordered:
            num_workers = min(num_workers, 1)
        workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if num_workers > 0 else {}
        self.loader = DataLoader(
            dataset_view, collate_fn=collate_view, num_workers=num_workers, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed), **sampling, **workers,
        )
        self.epoch = 0
        self.taken = 0
        self.skipped = 0
        self._epoch_start = self.generator.get_state()
        self._iterator: Optional[Iterator[tuple[Tensor, VLBatch, list[str]]]] = None

    def _start_epoch(self, skip: int = 0) -> None:
        self._epoch_start = self.generator.get_state()
        if self.batches is not None:
            self.batches.skip, self.batches.epoch = skip, self.epoch
        self._iterator = iter(self.loader)
        if self.ordered:
            for _ in range(skip):
                next(self._iterator)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> VLBatch:
        if self._iterator is None:
            self._start_epoch()
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch, self.taken = self.epoch + 1, 0
            self._start_epoch()
            try:
                item = next(self._iterator)
            except StopIteration:
                raise ValueError(f"{type(self.dataset).__name__} gives no batch of {self.batch_size} samples") from None
        indices, batch, skipped = item
        indices = indices.repeat_interleave(batch.rows_per_image)
        self.taken += 1
        self.skipped += len(skipped)
        return batch.replace(sample_seeds=sample_seeds(self.seed, self.epoch, indices.tolist()))

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the epoch, the batches taken in it, the order's generator state at
        the epoch's start, and the bad records skipped so far."""
        return {"epoch": self.epoch, "taken": self.taken, "generator": self._epoch_start.clone(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one that followed when it was recorded."""
        self.epoch, self.taken, self.skipped = int(state["epoch"]), int(state["taken"]), int(state.get("skipped", 0))
        self.generator.set_state(state["generator"])
        self._start_epoch(skip=self.taken)
