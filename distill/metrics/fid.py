"""FID with clean-fid's protocol: uint8 images, PIL bicubic resize ("clean"), Inception-v3 pool features.

clean-fid (Parmar et al., CVPR 2022) supplies the resizer, the Inception-v3 TorchScript network and the
Frechet distance; this module only batches images through an *injectable* feature extractor and caches
reference statistics. An extractor is any callable ``extractor(x) -> [N,D]`` taking ``x`` ``[N,3,S,S]``
float in [0, 255] (already resized to ``extractor.input_size``) with an ``extractor_id`` string that
names its weights (it keys the reference-statistics cache).

Weights are never downloaded here: clean-fid would fetch them silently into /tmp, which fails offline
and hides which network produced a number. :func:`load_inception` looks for the file and, when absent,
says where to get it and where to put it.
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
from torch import nn

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_cache_dir() -> Path:
    """Where metric weights and reference statistics live: ``$D2G_METRICS_HOME`` or ``~/.cache/diffusion2gan/metrics``."""
    return Path(os.environ.get("D2G_METRICS_HOME") or Path.home() / ".cache" / "diffusion2gan" / "metrics")


def _file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:limit]


class InceptionExtractor(nn.Module):
    """clean-fid's Inception-v3 (the TF-FID network as TorchScript): 2048-d pool3 features of 299 px images."""

    input_size = 299

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W

        path = Path(path)
        if path.name != INCEPTION_FILE:  # clean-fid loads <folder>/inception-2015-12-05.pt
            raise ValueError(f"the Inception weights file must be named {INCEPTION_FILE}, got {path.name}")
        self.net = InceptionV3W(str(path.parent), download=False)
        self.extractor_id = f"clean-fid-inception-v3/{_file_sha256(path, 12)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,299,299] in [0,255] -> [N,2048]
        return self.net(x)


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file at ``path`` (a file, or a folder holding it; default: the metrics cache dir)."""
    p = Path(path) if path else default_cache_dir()
    file = p / INCEPTION_FILE if p.is_dir() or not p.suffix else p
    if not file.is_file():
        raise FileNotFoundError(
            f"FID needs the Inception-v3 weights {INCEPTION_FILE} (clean-fid / StyleGAN2-ADA TorchScript, ~100 MB) and "
            f"{file} does not exist: download {INCEPTION_URL} and put it at {file}, or point fid_extractor at the file"
        )
    return file


def load_inception(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> InceptionExtractor:
    """The standard FID extractor; see :func:`inception_path` for where the weights are looked up."""
    return InceptionExtractor(inception_path(path)).to(device).eval()


class RandomTinyExtractor(nn.Module):
    """FOR TESTS ONLY: a two-layer random conv net (32 px input, 32-d features). Its FIDs mean nothing."""

    input_size = 32

    def __init__(self, seed: int = 0, dim: int = 32):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # same weights in every process, global RNG untouched
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        self.extractor_id = f"random-tiny/seed{seed}-dim{dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,32,32] in [0,255] -> [N,dim]
        return self.net(x / 127.5 - 1.0)


class ClassifierFeatureExtractor(nn.Module):
    """FID in a classifier's feature space (its ``features()``: e.g. the digits testbed's classifier,
    where Inception features mean little on 32 px digits). Input [N,3,S,S] in [0,255]."""

    def __init__(self, classifier: nn.Module, *, extractor_id: str):
        super().__init__()
        self.classifier = classifier.eval()
        self.input_size = int(classifier.config.image_size)
        self.extractor_id = extractor_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x / 127.5 - 1.0)


def is_classifier_folder(name: str | os.PathLike) -> bool:
    return Path(name, "config.json").is_file()


def load_classifier_extractor(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ClassifierFeatureExtractor:
    from teachers.digits_classifier import DigitClassifier

    weights = sorted(Path(path).glob("*.safetensors"))
    digest = _file_sha256(weights[0])[:16] if weights else "unknown"
    return ClassifierFeatureExtractor(DigitClassifier.from_pretrained(path), extractor_id=f"classifier/{digest}").to(device)


def load_fid_extractor(name: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """``inception`` (weights from the metrics cache dir), a path to the Inception file, a classifier
    folder (config.json + safetensors: FID in its feature space), or ``random-tiny`` (tests only)."""
    if name == "random-tiny":
        return RandomTinyExtractor().to(device).eval()
    if is_classifier_folder(name):
        return load_classifier_extractor(name, device=device)
    if name == "inception":
        return load_inception(None, device=device)
    return load_inception(name, device=device)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[N,3,H,W]`` in [-1, 1] -> ``[N,H,W,3]`` uint8, rounded as PNG writers do."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def load_image(path: str | os.PathLike, *, center_crop: bool = False) -> np.ndarray:
    """An image file as ``[H,W,3]`` uint8 RGB; ``center_crop`` takes the central square."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if center_crop and img.width != img.height:
            s = min(img.size)
            left, top = (img.width - s) // 2, (img.height - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return np.asarray(img, dtype=np.uint8).copy()


def clean_resize(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """clean-fid's resize: each ``[H,W,3]`` uint8 image, per channel in float, PIL bicubic -> ``[N,3,size,size]`` in [0,255]."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (size, size))
    return torch.stack([torch.from_numpy(np.ascontiguousarray(resize(img))).permute(2, 0, 1) for img in images])


@torch.no_grad()
def extract_features(
    images: Iterable[np.ndarray],
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features ``[N,D]`` (float64) of ``[H,W,3]`` uint8 images, resized to ``extractor.input_size``."""
    size = int(getattr(extractor, "input_size", 299))
    feats, batch = [], []

    def flush():
        x = clean_resize(batch, size).to(device)
        feats.append(extractor(x).double().cpu().numpy())
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError("no images to compute FID features of")
    return np.concatenate(feats)


class _ResizedImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], size: int, center_crop: bool):
        self.files, self.size, self.center_crop = list(files), size, center_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:  # [3,S,S] in [0,255]
        return clean_resize([load_image(self.files[i], center_crop=self.center_crop)], self.size)[0]


@torch.no_grad()
def extract_features_from_files(
    files: Sequence[str | os.PathLike],
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    center_crop: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features ``[N,D]`` (float64) of image files; decoding and the clean resize run in ``num_workers`` processes.

    Same numbers as :func:`extract_features` on the loaded images, for any ``num_workers``.
    """
    if not files:
        raise ValueError("no images to compute FID features of")
    size = int(getattr(extractor, "input_size", 299))
    loader = torch.utils.data.DataLoader(_ResizedImageFiles(files, size, center_crop), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    feats = []
    for x in loader:
        feats.append(extractor(x.to(device)).double().cpu().numpy())
        if progress is not None:
            progress(x.shape[0])
    return np.concatenate(feats)


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
        return cls(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), count=features.shape[0], extractor_id=extractor_id)

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
        raise ValueError(f"FID statistics have different feature sizes ({a.mu.shape[0]} vs {b.mu.shape[0]}): same extractor?")
    if a.extractor_id and b.extractor_id and a.extractor_id != b.extractor_id:
        raise ValueError(f"FID statistics come from different extractors ({a.extractor_id} vs {b.extractor_id})")
    return float(_fd(a.mu, a.sigma, b.mu, b.sigma))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference image folder {root} not found: pass a folder of images or an FID .npz statistics file")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"reference folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_set_hash(files: Sequence[Path], *, root: str | os.PathLike, center_crop: bool) -> str:
    """sha256 of the reference set: relative names and file contents, plus the preprocessing flag."""
    h = hashlib.sha256(f"center_crop={center_crop}\n".encode())
    for f in files:
        h.update(str(Path(f).relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


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
            raise ValueError(f"{ref} was computed with {stats.extractor_id}, not with the configured extractor {extractor_id}")
        return stats, {"reference": str(ref), "source": "statistics file"}
    if not extractor_id:
        raise ValueError("the FID extractor has no `extractor_id`, which names its weights in the reference-statistics cache")
    files = list_images(ref)
    if limit > 0:
        files = files[:limit]
    set_hash = image_set_hash(files, root=ref, center_crop=center_crop)
    key = hashlib.sha256(f"{set_hash}\n{extractor_id}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"fid-ref-{key}.npz"
    info = {"reference": str(ref), "num_images": len(files), "set_sha256": set_hash, "extractor_id": extractor_id, "cache": str(cache)}
    if cache.is_file():
        return FIDStats.load(cache), {**info, "source": "cache"}
    feats = extract_features_from_files(files, extractor=extractor, center_crop=center_crop, batch_size=batch_size,
                                        num_workers=num_workers, device=device, progress=progress)
    stats = FIDStats.from_features(feats, extractor_id=extractor_id)
    stats.save(cache)
    cache.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return stats, {**info, "source": "computed"}


def fid_from_files(
    files: Sequence[str | os.PathLike], reference: FIDStats, *, extractor, batch_size: int = 64, num_workers: int = 0,
    device="cpu", progress=None,
) -> float:
    """FID of image files against reference statistics."""
    feats = extract_features_from_files(files, extractor=extractor, batch_size=batch_size, num_workers=num_workers,
                                        device=device, progress=progress)
    return frechet_distance(FIDStats.from_features(feats, extractor_id=getattr(extractor, "extractor_id", "")), reference)


def fid_from_images(
    images: Iterable[np.ndarray], reference: FIDStats, *, extractor, batch_size: int = 64, device="cpu", progress=None
) -> float:
    """FID of ``[H,W,3]`` uint8 images against reference statistics."""
    feats = extract_features(images, extractor=extractor, batch_size=batch_size, device=device, progress=progress)
    return frechet_distance(FIDStats.from_features(feats, extractor_id=getattr(extractor, "extractor_id", "")), reference)
