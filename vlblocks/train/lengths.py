"""The sample lengths that length bucketing sorts by, read once before the first batch.

A dataset's `length(index)` reads its record (for Conceptual Captions, the detection file too),
so a large dataset's lengths take as long as reading it once; the DataLoader's worker processes
share that work when the run has any.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from vlblocks.data.errors import DataError

LENGTHS_PER_CHUNK = 1024


class _Lengths(Dataset):
    """`dataset.length(index)` as items. With `skip_bad_records`, a bad record's length is 0: it
    sorts first, and reading it for training skips it as it would without bucketing."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        try:
            return int(self.dataset.length(index))
        except DataError:
            if not getattr(self.dataset, "skip_bad_records", False):
                raise
            return 0


def sample_lengths(dataset: Dataset, num_workers: int = 0) -> list[int]:
    """[len(dataset)] lengths, `dataset.length(i)` for each i, in order; read in `num_workers`
    worker processes (chunks of `LENGTHS_PER_CHUNK`) when that is above 0.

    Raises:
        DataError: a record is bad and the dataset does not `skip_bad_records`.
    """
    chunks = DataLoader(_Lengths(dataset), batch_size=LENGTHS_PER_CHUNK, num_workers=num_workers, collate_fn=list)
    return [length for chunk in chunks for length in chunk]
