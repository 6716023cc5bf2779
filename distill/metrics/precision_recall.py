"""Improved precision and recall of a generative model (Kynkäänniemi et al., "Improved Precision and Recall
Metric for Assessing Generative Models", NeurIPS 2019, arXiv:1904.06991).

Each feature set stands for its manifold: the union of hyperspheres around its points, each with the
radius to that point's k-th nearest neighbour in its own set (the paper's k = 3). Precision is the share
of generated points inside the real manifold (are the samples realistic?), recall the share of real
points inside the generated manifold (do the samples cover the data's spread? a mode-collapsed
generator scores low). Everything runs on ``[chunk, chunk]`` blocks of distances, so 10k x 10k feature
sets need a few MB at a time, never the full ``[N,M]`` matrix.

Written here because neither metrics dependency has it: clean-fid (0.1.35) computes FID and KID only,
and torchmetrics (not a dependency) has classification precision/recall but not this one. torch-fidelity
has it, but would be one more dependency with its own extractors, while these numbers must come from
the same features as this toolkit's FID (``fid_extractor``).
"""

from __future__ import annotations

import torch


def _distance_blocks(queries: torch.Tensor, points: torch.Tensor, *, chunk_size: int):
    """Yield ``(row_start, col_start, distances [r,c])`` over all blocks of the ``[M,N]`` L2 distance matrix."""
    for r in range(0, queries.shape[0], chunk_size):
        q = queries[r : r + chunk_size]  # [r,D]
        for c in range(0, points.shape[0], chunk_size):
            yield r, c, torch.cdist(q, points[c : c + chunk_size])  # [r,c]


def knn_radii(*, features: torch.Tensor, k: int = 3, chunk_size: int = 1024) -> torch.Tensor:
    """Distance ``[N]`` from each of ``features`` ``[N,D]`` to its k-th nearest neighbour in the same set
    (the point itself excluded; a duplicate counts as a neighbour at distance 0)."""
    n = features.shape[0]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n <= k:
        raise ValueError(f"the k-nearest-neighbour radius needs more than k={k} points, got {n}")
    nearest = torch.full(
        (n, k + 1), float("inf"), dtype=features.dtype, device=features.device
    )  # [N,k+1] running smallest
    for r, _, d in _distance_blocks(features, features, chunk_size=chunk_size):
        rows = slice(r, r + d.shape[0])
        both = torch.cat([nearest[rows], d], dim=1)  # [r,k+1+c]
        nearest[rows] = both.topk(k + 1, dim=1, largest=False).values
    # The k+1 smallest include the point itself (distance 0, up to rounding): the k-th neighbour is the last.
    return nearest[:, k]  # [N]


def inside_manifold(
    *, queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Bool ``[M]``: is each of ``queries`` ``[M,D]`` within ``radii[j]`` of some ``centres[j]`` (``[N,D]``,
    ``[N]``)?"""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)  # [M]
    for r, c, d in _distance_blocks(queries, centres, chunk_size=chunk_size):
        rows = slice(r, r + d.shape[0])
        inside[rows] |= (d <= radii[c : c + d.shape[1]].unsqueeze(0)).any(dim=1)
    return inside


def precision_recall(
    *, real_features: torch.Tensor, generated_features: torch.Tensor, k: int = 3, chunk_size: int = 1024
) -> tuple[float, float]:
    """(precision, recall) of ``generated_features`` ``[M,D]`` against ``real_features`` ``[N,D]`` (same extractor).

    precision: share of generated points inside some real point's k-NN hypersphere;
    recall: share of real points inside some generated point's k-NN hypersphere."""
    if real_features.ndim != 2 or generated_features.ndim != 2 or real_features.shape[1] != generated_features.shape[1]:
        raise ValueError(
            f"precision/recall needs [N,D] and [M,D] features of one extractor, got "
            f"{tuple(real_features.shape)} and {tuple(generated_features.shape)}"
        )
    real_radii = knn_radii(features=real_features, k=k, chunk_size=chunk_size)  # [N]
    generated_radii = knn_radii(features=generated_features, k=k, chunk_size=chunk_size)  # [M]
    precision = inside_manifold(
        queries=generated_features, centres=real_features, radii=real_radii, chunk_size=chunk_size
    )
    recall = inside_manifold(
        queries=real_features, centres=generated_features, radii=generated_radii, chunk_size=chunk_size
    )
    return float(precision.double().mean()), float(recall.double().mean())
