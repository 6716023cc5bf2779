"""Per-step random streams derived from (seed, rank, step), so a resumed run continues the same stream.

The data order is a per-epoch permutation seeded by (seed, epoch) and shared by all ranks, each rank
taking its own slice: progress is a pure function of the step, with no sampler state to checkpoint.
"""

from __future__ import annotations

import functools
import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(*, seed: int, rank: int, step: int, purpose: str) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(seed, rank, step, purpose))


def batch_indices(*, seed: int, step: int, rank: int, world: int, batch_size: int, num_rows: int) -> list[int]:
    """Rows for (step, rank): consecutive slices of per-epoch permutations, no row twice per epoch."""
    per_step = batch_size * world
    start = step * per_step + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_rows)
        out.append(int(_epoch_permutation(seed, epoch, num_rows)[offset]))
    return out


@functools.lru_cache(maxsize=2)  # the current and the next epoch
def _epoch_permutation(seed: int, epoch: int, num_rows: int) -> torch.Tensor:
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
