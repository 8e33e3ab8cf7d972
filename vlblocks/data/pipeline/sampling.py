"""Length bucketing: batches of similar length waste less on padding."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """Yields batches of indices whose lengths are close.

    Each epoch: shuffle all indices, cut them into pools of `batch_size * pool_batches`, sort each
    pool by length, cut it into batches, and shuffle the batches. Batches stay random in content
    and order while padding shrinks.

    Args:
        lengths: length of each sample (e.g. text tokens + regions).
        batch_size: samples per batch.
        pool_batches: how many batches' worth of samples are sorted together.
        drop_last: drop a final short batch.
        seed: seeds the shuffles; each epoch draws new ones from it.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, pool_batches: int = 50, drop_last: bool = True, seed: int = 0) -> None:
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.pool_size = batch_size * pool_batches
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches = []
        for start in range(0, len(order), self.pool_size):
            pool = order[start : start + self.pool_size]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            for first in range(0, len(pool), self.batch_size):
                batch = pool[first : first + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        for position in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[position]

    def __len__(self) -> int:
        if not self.drop_last:
            return -(-len(self.lengths) // self.batch_size)
        pools, last_pool = divmod(len(self.lengths), self.pool_size)
        return pools * (self.pool_size // self.batch_size) + last_pool // self.batch_size
