"""Training batches as an endless, resumable stream: a checkpoint records where the stream is, and
a resumed run continues with the very batch that came next. Every batch carries its samples'
seeds, functions of (seed, epoch, sample index) only."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.sampling import LengthBucketSampler
from vlblocks.seeding import sample_seeds


class _Indexed(Dataset):
    """The samples of `dataset` with their index, so a batch knows which samples it holds."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _CollateIndexed:
    """`collate` over (index, sample) pairs → ([B] indices, batch); picklable for worker processes."""

    def __init__(self, collate: Callable[[list], VLBatch]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[Tensor, VLBatch]:
        return torch.tensor([index for index, _ in items]), self.collate([sample for _, sample in items])


class _SkipFirst(Sampler[list[int]]):
    """The batches of `batches` after the first `count` (their indices are drawn, not loaded)."""

    def __init__(self, batches: Sampler[list[int]], count: int) -> None:
        self.batches = batches
        self.count = count

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in enumerate(self.batches):
            if number >= self.count:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.count)


class BatchStream:
    """Batches of a dataset forever, epoch after epoch, with a position a checkpoint can hold.

    A map-style dataset is read in a new order each epoch, drawn from a generator seeded with
    `seed`: shuffled and cut into full batches (the last partial one is dropped), or grouped by
    length (`length_bucketing`, `LengthBucketSampler`). `state_dict` holds that generator's state
    at the start of the current epoch and the batches taken since; `load_state_dict` replays
    the epoch's order and skips those batches by index, without loading them. An iterable
    dataset (the text-only corpus) is read in order; a resumed stream reads past the batches
    already taken. Each batch comes with `sample_seeds` set from `seed`, its epoch and the
    indices of its samples (for the text stream, their positions in it).

    Args:
        dataset: samples that `collate` turns into a `VLBatch`.
        batch_size: samples per batch.
        collate: list of samples → `VLBatch`.
        seed: seeds the order of a map-style dataset.
        length_bucketing: batch samples of similar `dataset.length(i)` together.
        num_workers, pin_memory: as for `DataLoader`.
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
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.ordered = isinstance(dataset, IterableDataset)
        self.bucket_sampler: Optional[LengthBucketSampler] = None
        if length_bucketing and not self.ordered:
            if not hasattr(dataset, "length"):
                raise ValueError(f"Trainer.length_bucketing needs a dataset with length(index); {type(dataset).__name__} has none")
            self.bucket_sampler = LengthBucketSampler([dataset.length(i) for i in range(len(dataset))], batch_size, seed=seed)
            self.generator = self.bucket_sampler.generator
        else:
            self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.taken = 0
        self._epoch_start = self.generator.get_state()
        self._iterator: Optional[Iterator[VLBatch]] = None

    def _loader(self, skip: int) -> DataLoader:
        options = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.ordered:
            return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate, **options)
        indexed, collate = _Indexed(self.dataset), _CollateIndexed(self.collate)
        if self.bucket_sampler is not None:
            return DataLoader(indexed, batch_sampler=_SkipFirst(self.bucket_sampler, skip), collate_fn=collate, **options)
        batches = BatchSampler(RandomSampler(self.dataset, generator=self.generator), self.batch_size, drop_last=True)
        return DataLoader(indexed, batch_sampler=_SkipFirst(batches, skip), generator=self.generator, collate_fn=collate, **options)

    def _start_epoch(self, skip: int = 0) -> None:
        self._epoch_start = self.generator.get_state()
        if self.ordered:
            self._iterator = iter(self._loader(0))
            for _ in range(skip):
                next(self._iterator)
        else:
            self._iterator = iter(self._loader(skip))

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
        if self.ordered:
            batch = item
            indices = torch.arange(self.taken * self.batch_size, self.taken * self.batch_size + batch.batch_size)
        else:
            indices, batch = item
            indices = indices.repeat_interleave(batch.rows_per_image)
        self.taken += 1
        return batch.replace(sample_seeds=sample_seeds(self.seed, self.epoch, indices.tolist()))

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the epoch, the batches taken in it and the order's generator state
        at the epoch's start."""
        return {"epoch": self.epoch, "taken": self.taken, "generator": self._epoch_start.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one that followed when it was recorded."""
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self.generator.set_state(state["generator"])
        self._start_epoch(skip=self.taken)
