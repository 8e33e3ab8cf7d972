"""`run_lengths`: a run reads each training sample's length once, shared among its processes,
keeps the lengths in its folder, and a resumed run takes them from there without reading a record."""


import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset

from vlblocks.data.errors import DataError
from vlblocks.train.distributed import Processes
from vlblocks.train.lengths import run_lengths
from vlblocks.train.run_folder import claim_run_folder


class Recorded(Dataset):
    """Lengths 3 * index % 7; every `length` call is appended to `reads` (a file, so that worker
    and sibling processes' reads count too); the record at `bad` is bad."""

    skip_bad_records = False

    def __init__(self, size, reads, bad=None):
        self.size, self.reads, self.bad = size, reads, bad

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        raise AssertionError("lengths must not load samples")

    def length(self, index):
        with open(self.reads, "a") as file:
            file.write(f"{index}\n")
        if index == self.bad:
            raise DataError(f"data.json line {index + 1}, field 'frcnn': no such file")
        return 3 * index % 7


def reads(path):
    return sorted(int(line) for line in path.read_text().split()) if path.exists() else []


def test_a_run_reads_each_length_once_keeps_them_and_a_resumed_run_reads_none(tmp_path):
    said = []
    dataset, kept = Recorded(30, tmp_path / "reads.txt"), tmp_path / "run" / "lengths.npy"
    expected = [3 * index % 7 for index in range(30)]
    assert run_lengths(dataset, 2, Processes(), kept, reuse=False, echo=said.append) == expected
    assert reads(tmp_path / "reads.txt") == list(range(30))
    assert said == ["length bucketing: reading the length of each of the 30 training samples once, in 2 worker processes"]
    assert np.load(kept).tolist() == expected and not list(kept.parent.glob(".*partial"))

    (tmp_path / "reads.txt").unlink()
    assert run_lengths(dataset, 2, Processes(), kept, reuse=True, echo=said.append) == expected
    assert reads(tmp_path / "reads.txt") == [], "a resumed run reads no record for its lengths"
    assert said[-1] == f"length bucketing: the lengths of the 30 training samples from {kept}, as the run read them"

    assert run_lengths(dataset, 0, Processes(), kept, reuse=False, echo=said.append) == expected
    assert reads(tmp_path / "reads.txt") == list(range(30)), "a new run reads its data afresh, whatever the folder holds"


def test_kept_lengths_that_do_not_fit_the_data_are_read_again_with_the_reason(tmp_path):
    dataset, kept = Recorded(12, tmp_path / "reads.txt"), tmp_path / "lengths.npy"
    for content, reason in [
        (lambda: np.save(kept, np.arange(11)), "holds int64 values of shape [11], not the lengths of 12 samples"),
        (lambda: kept.write_bytes(b"\x93NUMPY truncated"), "is unreadable"),
        (lambda: np.save(kept, np.zeros(12)), "holds float64 values of shape [12]"),
        (lambda: kept.unlink(), "is missing"),
    ]:
        said = []
        content()
        assert run_lengths(dataset, 0, Processes(), kept, reuse=True, echo=said.append) == [3 * index % 7 for index in range(12)]
        assert said[0].startswith(f"length bucketing: {kept} {reason}") and said[0].endswith("; reading them again"), said[0]
        assert np.load(kept).tolist() == [3 * index % 7 for index in range(12)]


def read_lengths(rank, tmp_path, bad):
    """What `run_lengths` returned (or raised) in process `rank` of two."""
    processes = Processes(rank=rank, world_size=2, control=dist.group.WORLD)
    dataset = Recorded(25, tmp_path / f"reads-{rank}.txt", bad)
    try:
        return run_lengths(dataset, 1, processes, tmp_path / "lengths.npy", reuse=False, echo=lambda _: None)
    except DataError as error:
        return f"DataError: {error}"


def test_two_processes_each_read_half_and_both_get_every_length(tmp_path, in_two_gloo_processes):
    expected = [3 * index % 7 for index in range(25)]
    assert in_two_gloo_processes(read_lengths, tmp_path, None) == {0: expected, 1: expected}
    assert reads(tmp_path / "reads-0.txt") == list(range(0, 25, 2)) and reads(tmp_path / "reads-1.txt") == list(range(1, 25, 2))
    assert np.load(tmp_path / "lengths.npy").tolist() == expected


def test_a_bad_record_in_one_process_share_stops_both_by_name(tmp_path, in_two_gloo_processes):
    said = "DataError: data.json line 8, field 'frcnn': no such file"
    assert in_two_gloo_processes(read_lengths, tmp_path, 7) == {0: said, 1: said}, "the process without the bad record must not wait forever"
    assert not (tmp_path / "lengths.npy").exists()


def test_a_new_run_in_the_folder_drops_the_lengths_another_run_kept(tmp_path):
    np.save(tmp_path / "lengths.npy", np.arange(4))
    claim_run_folder(tmp_path, "recipe", resume=False)
    assert not (tmp_path / "lengths.npy").exists()
