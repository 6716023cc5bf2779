"""FID with clean-fid's protocol: uint8 images, PIL bicubic resize ("clean"), Inception-v3 pool features.

clean-fid (Parmar et al., CVPR 2022) supplies the resizer, the Inception-v3 TorchScript network and the
Frechet distance. This module holds the statistics (Gaussian fits, the cached reference statistics, the
distance) and the public entry points; the extractors and the feature path are in :mod:`.fid_features`,
image files in :mod:`.image_io` (their names stay importable from here).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from distill.metrics.fid_features import (  # noqa: F401  (re-exported: the metrics' public names)
    INCEPTION_FILE,
    INCEPTION_URL,
    ClassifierFeatureExtractor,
    InceptionExtractor,
    RandomTinyExtractor,
    default_cache_dir,
    extract_features,
    extract_features_from_files,
    inception_path,
    is_classifier_folder,
    load_fid_extractor,
    load_inception,
)
from distill.metrics.image_io import (  # noqa: F401
    IMAGE_EXTENSIONS,
    clean_resize,
    images_to_uint8,
    list_images,
    load_image,
    update_hash_from_file,
)


@dataclass
class FIDStats:
    """Gaussian fit of a feature set: mean ``[D]``, covariance ``[D,D]``, sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor_id: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, *, extractor_id: str = "") -> "FIDStats":
        if features.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
        return cls(
            mu=features.mean(axis=0),
            sigma=np.cov(features, rowvar=False),
            count=features.shape[0],
            extractor_id=extractor_id,
        )

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, count=self.count, extractor_id=self.extractor_id)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStats":
        """Our cache files, or clean-fid-style ``.npz`` files with ``mu`` and ``sigma``."""
        with np.load(path) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path} is not an FID statistics file (needs arrays 'mu' and 'sigma')")
            count = int(z["count"]) if "count" in z else 0
            ext = str(z["extractor_id"]) if "extractor_id" in z else ""
            return cls(mu=z["mu"], sigma=z["sigma"], count=count, extractor_id=ext)


def frechet_distance(a: FIDStats, b: FIDStats) -> float:
    """FID between two Gaussian fits (clean-fid's numerically stable implementation)."""
    from cleanfid.fid import frechet_distance as _fd

    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"FID statistics have different feature sizes ({a.mu.shape[0]} vs {b.mu.shape[0]}): same extractor?"
        )
    if a.extractor_id and b.extractor_id and a.extractor_id != b.extractor_id:
        raise ValueError(f"FID statistics come from different extractors ({a.extractor_id} vs {b.extractor_id})")
    return float(_fd(a.mu, a.sigma, b.mu, b.sigma))


def image_set_hash(files: Sequence[Path], *, root: str | os.PathLike, center_crop: bool) -> str:
    """sha256 of the reference set: relative names and file contents, plus the preprocessing flag."""
    h = hashlib.sha256(f"center_crop={center_crop}\n".encode())
    for f in files:
        h.update(str(Path(f).relative_to(root)).encode() + b"\0")
        update_hash_from_file(h, f)
    return h.hexdigest()


def _reference_set(
    ref: Path, *, extractor_id: str, cache_dir, limit: int, center_crop: bool
) -> tuple[list[Path], Path, dict]:
    """The reference folder's files (first ``limit`` when > 0), its statistics cache file and provenance."""
    files = list_images(ref)
    if limit > 0:
        files = files[:limit]
    set_hash = image_set_hash(files, root=ref, center_crop=center_crop)
    key = hashlib.sha256(f"{set_hash}\n{extractor_id}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"fid-ref-{key}.npz"
    info = {
        "reference": str(ref),
        "num_images": len(files),
        "set_sha256": set_hash,
        "extractor_id": extractor_id,
        "cache": str(cache),
    }
    return files, cache, info


def _save_statistics_cache(stats: FIDStats, cache: Path, info: dict) -> None:
    stats.save(cache)
    cache.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")


def reference_statistics(
    reference: str | os.PathLike,
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: str | os.PathLike,
    limit: int = 0,
    center_crop: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[FIDStats, dict]:
    """Statistics of a reference image folder (first ``limit`` files when > 0) or an ``.npz`` statistics file.

    Folder statistics are cached in ``cache_dir`` under a hash of the file contents and the extractor id,
    so a changed image or another extractor never reuses stale numbers. Returns (stats, provenance).
    """
    extractor_id = getattr(extractor, "extractor_id", None)
    ref = Path(reference)
    if ref.is_file() and ref.suffix == ".npz":
        stats = FIDStats.load(ref)
        if stats.extractor_id and extractor_id and stats.extractor_id != extractor_id:
            raise ValueError(
                f"{ref} was computed with {stats.extractor_id}, not with the configured extractor {extractor_id}"
            )
        return stats, {"reference": str(ref), "source": "statistics file"}
    if not extractor_id:
        raise ValueError(
            "the FID extractor has no `extractor_id`, which names its weights in the reference-statistics cache"
        )
    files, cache, info = _reference_set(
        ref, extractor_id=extractor_id, cache_dir=cache_dir, limit=limit, center_crop=center_crop
    )
    if cache.is_file():
        return FIDStats.load(cache), {**info, "source": "cache"}
    feats = extract_features_from_files(
        files,
        extractor=extractor,
        center_crop=center_crop,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    stats = FIDStats.from_features(feats, extractor_id=extractor_id)
    _save_statistics_cache(stats, cache, info)
    return stats, {**info, "source": "computed"}


def reference_features(
    reference: str | os.PathLike,
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: str | os.PathLike,
    limit: int = 0,
    center_crop: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[Path], dict]:
    """Features ``[N,D]`` of a reference image folder (the files and preprocessing of :func:`reference_statistics`),
    for metrics that need the points, not only their Gaussian fit (precision/recall, diversity).

    Returns (features, files, provenance). The features themselves are not cached (10k Inception features are
    160 MB); their statistics are, so an FID against the same reference in the same run reads them from the cache.
    """
    extractor_id = getattr(extractor, "extractor_id", None)
    ref = Path(reference)
    if not ref.is_dir():
        raise ValueError(
            f"reference {ref} is not an image folder: precision/recall and diversity need the real images, "
            "not an .npz of FID statistics"
        )
    if not extractor_id:
        raise ValueError(
            "the FID extractor has no `extractor_id`, which names its weights in the reference-statistics cache"
        )
    files, cache, info = _reference_set(
        ref, extractor_id=extractor_id, cache_dir=cache_dir, limit=limit, center_crop=center_crop
    )
    feats = extract_features_from_files(
        files,
        extractor=extractor,
        center_crop=center_crop,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    if not cache.is_file() and len(files) >= 2:
        _save_statistics_cache(FIDStats.from_features(feats, extractor_id=extractor_id), cache, info)
    return feats, files, {**info, "source": "computed"}


def _fid_of_features(features: np.ndarray, reference: FIDStats, *, extractor) -> float:
    return frechet_distance(
        FIDStats.from_features(features, extractor_id=getattr(extractor, "extractor_id", "")), reference
    )


def fid_from_files(
    files: Sequence[str | os.PathLike],
    reference: FIDStats,
    *,
    extractor,
    batch_size: int = 64,
    num_workers: int = 0,
    device="cpu",
    progress=None,
) -> float:
    """FID of image files against reference statistics."""
    feats = extract_features_from_files(
        files, extractor=extractor, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress
    )
    return _fid_of_features(feats, reference, extractor=extractor)


def fid_from_images(
    images: Iterable[np.ndarray], reference: FIDStats, *, extractor, batch_size: int = 64, device="cpu", progress=None
) -> float:
    """FID of ``[H,W,3]`` uint8 images against reference statistics."""
    feats = extract_features(images, extractor=extractor, batch_size=batch_size, device=device, progress=progress)
    return _fid_of_features(feats, reference, extractor=extractor)
