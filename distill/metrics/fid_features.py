"""FID feature extractors (clean-fid's Inception-v3, a classifier's feature space, a random test net) and
the one feature path: batches of clean-resized ``[N,3,S,S]`` images in [0, 255] -> ``[N,D]`` float64.

An extractor is any callable ``extractor(x) -> [N,D]`` with an ``input_size`` and an ``extractor_id``
string that names its weights (it keys the reference-statistics cache). Weights are never downloaded
here: clean-fid would fetch them silently into /tmp, which fails offline and hides which network
produced a number. :func:`inception_path` looks for the file and, when absent, says where to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from distill.metrics import TEST_ONLY
from distill.metrics.image_io import clean_resize, file_sha256, load_image

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def default_cache_dir() -> Path:
    """Where metric weights and reference statistics live: ``$D2G_METRICS_HOME`` or
    ``~/.cache/diffusion2gan/metrics``."""
    return Path(os.environ.get("D2G_METRICS_HOME") or Path.home() / ".cache" / "diffusion2gan" / "metrics")


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
        self.extractor_id = f"clean-fid-inception-v3/{file_sha256(path, 12)}"

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
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, dim, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
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


ClassifierLoader = Callable[[str | os.PathLike], nn.Module]  # folder -> a module with features() and config.image_size


def load_classifier_extractor(
    path: str | os.PathLike, *, load_classifier: ClassifierLoader, device: str | torch.device = "cpu"
) -> ClassifierFeatureExtractor:
    """The classifier folder ``path`` (read by the caller's ``load_classifier``) as an FID extractor,
    named by its weights' hash."""
    weights = sorted(Path(path).glob("*.safetensors"))
    digest = file_sha256(weights[0], 16) if weights else "unknown"
    return ClassifierFeatureExtractor(load_classifier(path), extractor_id=f"classifier/{digest}").to(device)


def load_fid_extractor(
    name: str, *, device: str | torch.device = "cpu", load_classifier: ClassifierLoader | None = None
) -> nn.Module:
    """``inception`` (weights from the metrics cache dir), a path to the Inception file, a classifier
    folder (config.json + safetensors: FID in its feature space, read with ``load_classifier``), or
    ``random-tiny`` (tests only)."""
    if name == TEST_ONLY:
        return RandomTinyExtractor().to(device).eval()
    if is_classifier_folder(name):
        if load_classifier is None:
            raise ValueError(f"{name} is a classifier folder: pass load_classifier to read it as an FID extractor")
        return load_classifier_extractor(name, load_classifier=load_classifier, device=device)
    if name == "inception":
        return load_inception(None, device=device)
    return load_inception(name, device=device)


@torch.no_grad()
def features_of_batches(
    batches: Iterable[torch.Tensor],
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features ``[N,D]`` (float64) of batches ``[B,3,S,S]`` in [0,255] already resized to ``extractor.input_size``."""
    feats = []
    for x in batches:
        feats.append(extractor(x.to(device)).double().cpu().numpy())
        if progress is not None:
            progress(x.shape[0])
    if not feats:
        raise ValueError("no images to compute FID features of")
    return np.concatenate(feats)


def _input_size(extractor) -> int:
    return int(getattr(extractor, "input_size", 299))


def _resized_batches(images: Iterable[np.ndarray], *, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    batch = []
    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            yield clean_resize(batch, size)
            batch = []
    if batch:
        yield clean_resize(batch, size)


def extract_features(
    images: Iterable[np.ndarray],
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features ``[N,D]`` (float64) of ``[H,W,3]`` uint8 images, resized to ``extractor.input_size``."""
    batches = _resized_batches(images, size=_input_size(extractor), batch_size=batch_size)
    return features_of_batches(batches, extractor=extractor, device=device, progress=progress)


class _ResizedImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], size: int, center_crop: bool):
        self.files, self.size, self.center_crop = list(files), size, center_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:  # [3,S,S] in [0,255]
        return clean_resize([load_image(self.files[i], center_crop=self.center_crop)], self.size)[0]


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
    loader = torch.utils.data.DataLoader(
        _ResizedImageFiles(files, _input_size(extractor), center_crop),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    return features_of_batches(loader, extractor=extractor, device=device, progress=progress)
