"""The sample lengths that length bucketing sorts by, read once per run, before the first batch.

A dataset's `length(index)` reads its record, or the part of it that holds the length (for
Conceptual Captions, the caption and the detection file's `num_boxes`), so a large dataset's
lengths take a pass over its files. The DataLoader's worker processes share that work when the
run has any, the processes of a distributed run each read their share, and the run keeps the
lengths in its folder, so that a resumed run reads none of them again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from vlblocks.contracts import Echo
from vlblocks.data.errors import DataError
from vlblocks.train.distributed import Processes

LENGTHS_PER_CHUNK = 1024


class _Lengths(Dataset):
    """`dataset.length(index)` as items. With `skip_bad_records`, a bad record's length is 0: it
    sorts first, and reading it for training skips it as it would without bucketing. Without
    it, the item is the error's message, raised where the lengths arrive (a worker process's
    error would come wrapped in its traceback)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> int | str:
        try:
            return int(self.dataset.length(self.indices[position]))
        except DataError as error:
            return 0 if getattr(self.dataset, "skip_bad_records", False) else str(error)


def sample_lengths(dataset: Dataset, num_workers: int = 0, indices: Optional[Sequence[int]] = None) -> list[int]:
    """`dataset.length(i)` for each i of `indices` (default: every sample), in order; read in
    `num_workers` worker processes (chunks of `LENGTHS_PER_CHUNK`) when that is above 0.

    Raises:
        DataError: a record is bad and the dataset does not `skip_bad_records`.
    """
    wanted = _Lengths(dataset, range(len(dataset)) if indices is None else indices)
    lengths = []
    for chunk in DataLoader(wanted, batch_size=LENGTHS_PER_CHUNK, num_workers=num_workers, collate_fn=list):
        failure = next((length for length in chunk if isinstance(length, str)), None)
        if failure is not None:
            raise DataError(failure)
        lengths += chunk
    return lengths


def run_lengths(dataset: Dataset, num_workers: int, processes: Processes, kept: Path, reuse: bool, echo: Echo) -> list[int]:
    """[len(dataset)] lengths for a run's length bucketing: from the file `kept` when `reuse` (a
    resumed run) and it holds one length per sample; otherwise read, every process reading every
    `world_size`-th sample in its `num_workers` workers, gathered in every process, and written
    to `kept` by the main process (to a temporary name, fsynced, then renamed).

    Raises:
        DataError: a record is bad and the dataset does not `skip_bad_records`.
    """
    count = len(dataset)
    if reuse:
        lengths, problem = _read_kept(kept, count)
        if lengths is not None:
            echo(f"length bucketing: the lengths of the {count} training samples from {kept}, as the run read them")
            return lengths
        echo(f"length bucketing: {problem}; reading them again")
    where = f", in {num_workers} worker process{'es' if num_workers > 1 else ''}" if num_workers else ""
    shared = f", each of {processes.world_size} processes reading its share" if processes.distributed else ""
    echo(f"length bucketing: reading the length of each of the {count} training samples once{where}{shared}")
    try:
        mine, failure = sample_lengths(dataset, num_workers, range(processes.rank, count, processes.world_size)), None
    except DataError as error:  # every process must reach the exchange, and then stops with it
        mine, failure = [], str(error)
    shares = processes.gather((mine, failure))
    failures = [failure for _, failure in shares if failure is not None]
    if failures:
        raise DataError(failures[0])
    lengths = [0] * count
    for rank, (share, _) in enumerate(shares):
        lengths[rank :: processes.world_size] = share
    if processes.is_main:
        _write_kept(kept, lengths)
    return lengths


def _read_kept(kept: Path, count: int) -> tuple[Optional[list[int]], str]:
    """(the lengths in `kept`, "") or (None, why they cannot be used)."""
    if not kept.is_file():
        return None, f"{kept} is missing"
    try:
        lengths = np.load(kept, allow_pickle=False)
    except (OSError, ValueError) as error:
        return None, f"{kept} is unreadable ({error})"
    if lengths.dtype.kind not in "iu" or lengths.shape != (count,):
        return None, f"{kept} holds {lengths.dtype} values of shape {list(lengths.shape)}, not the lengths of {count} samples"
    return lengths.tolist(), ""


def _write_kept(kept: Path, lengths: list[int]) -> None:
    kept.parent.mkdir(parents=True, exist_ok=True)
    temporary = kept.with_name(f".{kept.name}.partial")
    with open(temporary, "wb") as file:
        np.save(file, np.asarray(lengths, dtype=np.int64))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, kept)
