"""BatchStream: the same batches as a shuffling DataLoader, a stream restored from its state
continues with exactly the batches that came next, and every sample's seed depends only on
(seed, epoch, index)."""

import os

import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, IterableDataset, RandomSampler

from vlblocks.batch import VLBatch
from vlblocks.data.errors import DataError
from vlblocks.seeding import sample_seeds
from vlblocks.train.batches import BatchStream
from vlblocks.train.lengths import sample_lengths


class Numbers(Dataset):
    def __init__(self, size):
        self.size = size
        self.loaded = []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.loaded.append(index)
        return index

    def length(self, index):
        return index % 5


class Counted(int):
    """A number that is also its position in the stream (as `TextChunk.position`)."""

    @property
    def position(self):
        return int(self)


class Counting(IterableDataset):
    def __iter__(self):
        return map(Counted, range(1000))


def as_batch(samples):
    """Samples (numbers) as a one-token-per-row `VLBatch` whose token is the number."""
    rows = len(samples)
    ids = torch.tensor([int(sample) for sample in samples])[:, None]
    return VLBatch(text_ids=ids, segment_ids=torch.zeros_like(ids), text_mask=torch.ones(rows, 1, dtype=torch.bool),
                   boxes=torch.zeros(rows, 0, 4), region_mask=torch.zeros(rows, 0, dtype=torch.bool), image_sizes=torch.ones(rows, 2))


def take(stream, count):
    return [next(stream).text_ids.flatten().tolist() for _ in range(count)]


def test_the_stream_draws_a_seeded_shuffle_each_epoch():
    generator = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(3):
        expected += list(BatchSampler(RandomSampler(range(10), generator=generator), 3, drop_last=True))
    assert take(BatchStream(Numbers(10), 3, as_batch, seed=3), 9) == expected


def test_worker_processes_give_the_same_batches_and_resume_the_same():
    for bucketing in (False, True):
        alone = take(BatchStream(Numbers(10), 3, as_batch, seed=4, length_bucketing=bucketing), 7)
        workers = BatchStream(Numbers(10), 3, as_batch, seed=4, length_bucketing=bucketing, num_workers=2)
        assert take(workers, 4) == alone[:4]
        resumed = BatchStream(Numbers(10), 3, as_batch, seed=4, length_bucketing=bucketing, num_workers=2)
        resumed.load_state_dict(workers.state_dict())
        assert take(resumed, 3) == alone[4:]
    in_order = take(BatchStream(Counting(), 4, as_batch), 3)
    assert take(BatchStream(Counting(), 4, as_batch, num_workers=1), 3) == in_order
    assert take(BatchStream(Counting(), 4, as_batch, num_workers=2), 3) == in_order, "one worker reads an iterable dataset, not each"


class ProcessIds(Dataset):
    """Each sample is the id of the process that read it."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return os.getpid()


def test_one_loader_whose_workers_serve_every_epoch():
    stream = BatchStream(ProcessIds(), 3, as_batch, num_workers=1)
    readers = {pid for _ in range(6) for pid in take(stream, 1)[0]}  # 3 epochs of 2 batches
    assert len(readers) == 1 and os.getpid() not in readers


class SkipsOddRecords(Dataset):
    """A dataset read with `skip_bad_records`: records with odd indices are bad."""

    skip_bad_records = True

    def __init__(self):
        self.skipped = []

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index % 2:
            self.skipped.append(f"record {index} is bad")
        return index


def test_bad_records_skipped_in_worker_processes_are_counted():
    for workers in (0, 1):
        dataset = SkipsOddRecords()
        stream = BatchStream(dataset, 4, as_batch, num_workers=workers)
        take(stream, 4)  # two epochs: 4 odd indices each
        assert stream.skipped == 8
        assert len(dataset.skipped) == (8 if workers == 0 else 0), "with workers, the main process's copy sees nothing"
        resumed = BatchStream(SkipsOddRecords(), 4, as_batch)
        resumed.load_state_dict(stream.state_dict())
        assert resumed.skipped == 8


def test_a_restored_stream_continues_with_the_next_batch_without_loading_the_skipped_ones():
    for bucketing in (False, True):
        reference = take(BatchStream(Numbers(10), 3, as_batch, seed=5, length_bucketing=bucketing), 11)
        first = BatchStream(Numbers(10), 3, as_batch, seed=5, length_bucketing=bucketing)
        assert take(first, 7) == reference[:7]  # 3 batches an epoch: stopped in the third epoch
        state = first.state_dict()
        assert (state["epoch"], state["taken"]) == (2, 1)
        data = Numbers(10)
        resumed = BatchStream(data, 3, as_batch, seed=5, length_bucketing=bucketing)
        resumed.load_state_dict(state)
        assert take(resumed, 4) == reference[7:]
        assert len(data.loaded) == 4 * 3, "skipped batches are not loaded"


def test_an_ordered_stream_resumes_after_the_batches_taken():
    first = BatchStream(Counting(), 4, as_batch)
    take(first, 5)
    resumed = BatchStream(Counting(), 4, as_batch)
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 1) == [[20, 21, 22, 23]] == take(first, 1)


def test_processes_share_each_global_batch_and_see_every_sample_once():
    single = take(BatchStream(Numbers(12), 4, as_batch, seed=2), 6)  # two epochs of 3 batches
    shares = [take(BatchStream(Numbers(12), 2, as_batch, seed=2, rank=rank, world_size=2), 6) for rank in (0, 1)]
    assert [shares[0][step] + shares[1][step] for step in range(6)] == single
    for epoch in (0, 1):
        seen = [index for rank in (0, 1) for batch in shares[rank][3 * epoch : 3 * epoch + 3] for index in batch]
        assert sorted(seen) == list(range(12))
    text = [take(BatchStream(Counting(), 2, as_batch, rank=rank, world_size=2), 2) for rank in (0, 1)]
    assert text == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_each_batch_carries_the_seeds_of_its_samples():
    stream = BatchStream(Numbers(10), 3, as_batch, seed=9)
    for epoch in range(2):
        for _ in range(3):
            batch = next(stream)
            assert torch.equal(batch.sample_seeds, sample_seeds(9, epoch, batch.text_ids.flatten().tolist()))
    text = next(BatchStream(Counting(), 4, as_batch, seed=9))
    assert torch.equal(text.sample_seeds, sample_seeds(9, 0, [0, 1, 2, 3]))


class Augmented(Numbers):
    """A dataset with random augmentation: each sample is index x 10 + the epoch it was read in."""

    def item_in_epoch(self, index, epoch):
        self.loaded.append(index)
        return index * 10 + epoch


def test_datasets_with_augmentation_read_each_sample_with_its_epoch():
    for workers in (0, 2):
        stream = BatchStream(Augmented(6), 3, as_batch, seed=1, num_workers=workers)
        epochs = [sorted(value for batch in take(stream, 2) for value in batch) for _ in range(3)]
        assert epochs == [[10 * index + epoch for index in range(6)] for epoch in range(3)]
        resumed = BatchStream(Augmented(6), 3, as_batch, seed=1, num_workers=workers)
        stream = BatchStream(Augmented(6), 3, as_batch, seed=1)
        take(stream, 3)
        resumed.load_state_dict(stream.state_dict())
        assert take(resumed, 3) == take(stream, 3)  # epoch 1's second batch, then epoch 2's


class BadLengths(Numbers):
    """Records whose index is a multiple of 3 are bad: reading them, even for their length, fails."""

    def __init__(self, size, skip_bad_records):
        super().__init__(size)
        self.skip_bad_records = skip_bad_records

    def length(self, index):
        if index % 3 == 0:
            raise DataError(f"data.json line {index + 1}, field 'frcnn': no such file")
        return index % 5


def test_bucketing_reads_every_length_once_in_the_workers_too():
    for workers in (0, 2):
        assert sample_lengths(Numbers(2500), workers) == [index % 5 for index in range(2500)]  # three chunks
    assert sample_lengths(BadLengths(7, skip_bad_records=True), 2) == [0, 1, 2, 0, 4, 0, 0]


def test_a_bad_record_stops_bucketing_by_name_unless_bad_records_are_skipped():
    with pytest.raises(DataError, match="data.json line 1, field 'frcnn'"):
        BatchStream(BadLengths(10, skip_bad_records=False), 3, as_batch, length_bucketing=True)
    stream = BatchStream(BadLengths(10, skip_bad_records=True), 3, as_batch, length_bucketing=True)
    epoch = sum(take(stream, 3), [])  # 3 full batches of 3 out of 10 samples
    assert len(set(epoch)) == 9 and set(epoch) <= set(range(10))
