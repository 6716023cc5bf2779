"""Per-prompt diversity: the mean pairwise L2 distance between the samples of one prompt (or one class), in a
feature space (the evaluation's FID features), averaged over prompts.

A generator that ignores its noise (mode collapse within a prompt) draws near-identical images per prompt
and scores near 0; the same number for the real images of each class is the data's own spread, so
``diversity / diversity_real`` near 1 means the samples vary as much as the data does.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch


def mean_pairwise_distance(*, features: torch.Tensor, chunk_size: int = 1024) -> float:
    """Mean L2 distance over all pairs ``i != j`` of ``features`` ``[n,D]`` (n >= 2), in ``[chunk, n]`` blocks."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"a mean pairwise distance needs at least 2 points, got {n}")
    total = torch.zeros((), dtype=torch.float64, device=features.device)
    for r in range(0, n, chunk_size):
        d = torch.cdist(features[r : r + chunk_size], features)  # [r,n]
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + r] = 0  # a point and itself (exactly 0; cdist's matmul form may leave rounding)
        total += d.double().sum()
    return float(total / (n * (n - 1)))


def group_diversity(
    *, features: torch.Tensor, groups: Sequence[Hashable], chunk_size: int = 1024
) -> dict[Hashable, float]:
    """Mean pairwise distance within each group: ``features`` ``[N,D]``, ``groups`` ``[N]`` (row i's group key).

    Returns ``{group: mean pairwise distance}`` for the groups with at least 2 rows (in first-seen order);
    groups of one row have no pairs and are left out."""
    if len(groups) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(groups)} group keys")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return {
        g: mean_pairwise_distance(features=features[torch.tensor(idx, device=features.device)], chunk_size=chunk_size)
        for g, idx in members.items()
        if len(idx) >= 2
    }
