"""BatchStream: the same batches as a shuffling DataLoader, a stream restored from its state
continues with exactly the batches that came next, and every sample's seed depends only on
(seed, epoch, index)."""

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vlblocks.batch import VLBatch
from vlblocks.seeding import sample_seeds
from vlblocks.train.batches import BatchStream


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


class Counting(IterableDataset):
    def __iter__(self):
        return iter(range(1000))


def as_list(batch):
    return list(batch)


def as_batch(samples):
    """Samples (numbers) as a one-token-per-row `VLBatch` whose token is the number."""
    rows = len(samples)
    ids = torch.tensor(samples)[:, None]
    return VLBatch(text_ids=ids, segment_ids=torch.zeros_like(ids), text_mask=torch.ones(rows, 1, dtype=torch.bool),
                   boxes=torch.zeros(rows, 0, 4), region_mask=torch.zeros(rows, 0, dtype=torch.bool), image_sizes=torch.ones(rows, 2))


def take(stream, count):
    return [next(stream).text_ids.flatten().tolist() for _ in range(count)]


def test_the_stream_draws_the_order_a_seeded_shuffling_loader_draws():
    generator = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(3):
        expected += list(DataLoader(Numbers(10), batch_size=3, shuffle=True, drop_last=True, generator=generator, collate_fn=as_list))
    assert take(BatchStream(Numbers(10), 3, as_batch, seed=3), 9) == expected


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


def test_each_batch_carries_the_seeds_of_its_samples():
    stream = BatchStream(Numbers(10), 3, as_batch, seed=9)
    for epoch in range(2):
        for _ in range(3):
            batch = next(stream)
            assert torch.equal(batch.sample_seeds, sample_seeds(9, epoch, batch.text_ids.flatten().tolist()))
    text = next(BatchStream(Counting(), 4, as_batch, seed=9))
    assert torch.equal(text.sample_seeds, sample_seeds(9, 0, [0, 1, 2, 3]))
