"""Seeds that are functions of what they seed, never of where it happens to be: a sample's seed
depends only on (run seed, epoch, sample index), so its masking is the same whichever batch,
process or accumulation step it lands in, and each objective draws from its own seed derived
from the sample's."""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

import torch
from torch import Tensor

SEED_BITS = 62  # seeds fit int64 with room to spare
DATA_DRAWS_SALT = 7  # keeps a sample's data-side draws apart from its objectives' streams


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2**62) that depends only on `parts` (a stable hash, the same on every
    machine and Python version)."""
    digest = hashlib.blake2b("/".join(str(int(part)) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def sample_seeds(seed: int, epoch: int, indices: Iterable[int]) -> Tensor:
    """[B] int64: the seed of each sample `indices[b]` in `epoch` of a run seeded `seed`."""
    return torch.tensor([mix_seed(seed, epoch, index) for index in indices], dtype=torch.long)


def sample_random(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of sample `index`'s data-side draws in `epoch` (flip, blanked image, dropped
    caption): new draws each epoch, as the official loaders draw on every read, yet a function
    of (seed, epoch, index) only, whichever worker or process reads the sample."""
    return random.Random(mix_seed(seed, epoch, index, DATA_DRAWS_SALT))


def row_generators(seeds: Tensor, salt: int) -> list[torch.Generator]:
    """One CPU generator per row, seeded from the row's seed and `salt` (an objective's own
    number), so two objectives never draw the same numbers for a sample."""
    return [torch.Generator().manual_seed(mix_seed(int(seed), salt)) for seed in seeds.tolist()]
