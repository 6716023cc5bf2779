"""Per-sample Gaussian noise that depends only on (seed, index).

Each row of a pairs dataset draws its noise from its own CPU ``torch.Generator`` (EDM/StyleGAN
practice: per-sample seeds), so a row is the same whatever the number of processes, the batch size,
or which run wrote it, and anyone can regenerate it from the stored ``seed`` column.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of row ``index`` (an int63, stored in the ``seed`` column).

    A hash rather than ``seed * K + index`` so that different (seed, index) pairs never collide.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_for_seed(sample_seed_: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit Gaussian noise ``[*shape]`` drawn on the CPU from ``sample_seed_`` (device independent)."""
    gen = torch.Generator("cpu").manual_seed(int(sample_seed_))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def noise_for_indices(
    *, seed: int, indices: list[int], shape: tuple[int, int, int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[int]]:
    """Noise for a batch of rows: ``([N,C,H,W] tensor, per-row seeds)``.

    ``dtype`` is the storage dtype: the noise is rounded to it here, so the tensor given to the
    teacher is exactly the one that gets stored.
    """
    seeds = [sample_seed(seed, i) for i in indices]
    noise = torch.stack([noise_for_seed(s, shape, dtype) for s in seeds])  # [N,C,H,W]
    return noise, seeds
