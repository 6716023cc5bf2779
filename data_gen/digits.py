"""scikit-learn's bundled handwritten digits as a tiny text-to-image data set.

1797 grey 8x8 digits (ink 0..16) become [N, 3, 32, 32] images in [-1, 1] (bilinear upsampling, the
grey value copied to three channels so RGB models and VAEs apply unchanged), each with a caption
drawn from five phrasings of its class. The split is fixed (seeded permutation, stratified per
class) so every script evaluates on the same held-out digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {name}: the spelled-out digit, {digit}: the numeral; several phrasings so the text encoder has to
# learn the class, not one fixed string.
CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a scanned handwritten {name}",
    "a hand-drawn digit {digit}",
    "the digit {name}, handwritten in ink",
)
SPLITS = ("train", "held_out", "all")


def captions_for_label(*, label: int) -> list[str]:
    """The five captions of digit class ``label`` (0-9), in a fixed order."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in 0..9, got {label}")
    return [t.format(name=DIGIT_NAMES[int(label)], digit=int(label)) for t in CAPTION_TEMPLATES]


def sample_captions(
    *, labels: torch.Tensor | np.ndarray | list[int], generator: torch.Generator | None = None
) -> list[str]:
    """One randomly chosen phrasing per label (labels: [N] ints)."""
    labels = [int(x) for x in labels]
    choice = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=generator).tolist()
    return [captions_for_label(label=lab)[c] for lab, c in zip(labels, choice)]


def pixels_to_images(*, pixels: np.ndarray, size: int = 32) -> torch.Tensor:
    """sklearn digit pixels [N, 8, 8] in 0..16 -> images [N, 3, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).contiguous()  # [N,3,size,size]


def split_indices(
    *, labels: np.ndarray, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded ``held_out_fraction`` goes to held-out."""
    rng = np.random.RandomState(seed)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(len(idx) * held_out_fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_digits_images(
    *, split: str = "train", size: int = 32, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, size, size] in [-1, 1] and labels [N] (int64) of one split of sklearn's digits.

    With the defaults: 1438 train, 359 held-out digits (20 % of each class, rounded).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    pixels, labels = data.images, data.target.astype(np.int64)  # [1797,8,8], [1797]
    if split != "all":
        train_idx, held_idx = split_indices(labels=labels, held_out_fraction=held_out_fraction, seed=seed)
        keep = train_idx if split == "train" else held_idx
        pixels, labels = pixels[keep], labels[keep]
    return pixels_to_images(pixels=pixels, size=size), torch.from_numpy(labels)


def save_digits_dataset(*, path: str, split: str = "train", size: int = 32) -> str:
    """Write a split as a Parquet ``datasets`` image dataset (``image``, ``label``) at ``path``.

    The E-LatentLPIPS recipe (stage 1) and FID reference folders read data in these standard forms.
    """
    import datasets
    from PIL import Image

    images, labels = load_digits_images(split=split, size=size)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in _uint8(images)], "label": [int(l) for l in labels]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_NAMES))}),
    )
    ds.to_parquet(path)
    return path


def save_digits_imagefolder(path: str | Path, *, split: str = "train", size: int = 32) -> Path:
    """Write a split as an ``imagefolder`` text-to-image dataset: numbered PNGs and ``metadata.jsonl`` with
    ``text`` (the five captions of the image's class; a trainer draws one per use) and ``label``."""
    import json

    from PIL import Image

    path = Path(path)
    images, labels = load_digits_images(split=split, size=size)
    tmp = path.with_name(path.name + ".partial")  # a killed run leaves no half-written dataset behind
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "metadata.jsonl", "w") as fh:
        for i, (pixels, label) in enumerate(zip(_uint8(images), labels.tolist())):
            Image.fromarray(pixels).save(tmp / f"{i:04d}.png")
            fh.write(
                json.dumps({"file_name": f"{i:04d}.png", "text": captions_for_label(label=label), "label": label})
                + "\n"
            )
    tmp.replace(path)
    return path


def save_digits_reference(path: str | Path, *, split: str = "held_out", size: int = 32) -> Path:
    """Write a split as numbered PNGs: the real-image reference folder of the testbed's FID, with each image's
    class in ``metadata.jsonl`` (``file_name``, ``label``; what the evaluation's ``diversity_real`` groups by)."""
    import json

    from PIL import Image

    path = Path(path)
    images, labels = load_digits_images(split=split, size=size)
    pixels = _uint8(images)
    tmp = path.with_name(path.name + ".partial")  # a killed run leaves no half-written reference behind
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "metadata.jsonl", "w") as fh:
        for i, (p, label) in enumerate(zip(pixels, labels.tolist())):
            Image.fromarray(p).save(tmp / f"{i:04d}.png")
            fh.write(json.dumps({"file_name": f"{i:04d}.png", "label": label}) + "\n")
    tmp.replace(path)
    return path


def _uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [-1, 1] -> [N,H,W,3] uint8, rounded as image writers do."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
