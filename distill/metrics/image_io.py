"""Image files for the metrics: listing, decoding, clean-fid's resize, uint8 conversion, content hashes, folder
labels."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def update_hash_from_file(h, path: str | os.PathLike) -> None:
    """Feed a file's bytes into the hash ``h`` in 1 MiB chunks (reference sets can be many GB)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    update_hash_from_file(h, path)
    return h.hexdigest()[:limit]


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
    """clean-fid's resize: each ``[H,W,3]`` uint8 image, per channel in float, PIL bicubic -> ``[N,3,size,size]`` in
    [0,255]."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (size, size))
    return torch.stack([torch.from_numpy(np.ascontiguousarray(resize(img))).permute(2, 0, 1) for img in images])


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"reference image folder {root} not found: pass a folder of images or an FID .npz statistics file"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"reference folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def folder_labels(folder: str | os.PathLike, files: Sequence[Path], *, column: str = "label") -> list[int] | None:
    """Integer labels ``[N]`` of ``files`` in an image folder from its ``metadata.jsonl`` (the ``imagefolder``
    convention: one row per image with ``file_name``, relative to the folder, and ``column``); None when
    the folder has no such file or its rows have no ``column``."""
    import json

    meta = Path(folder) / "metadata.jsonl"
    if not meta.is_file():
        return None
    labels = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if column not in row:
            return None
        if "file_name" not in row:
            raise ValueError(f"{meta} line {n} has no `file_name`")
        if not isinstance(row[column], (int, float, str)) or str(row[column]).strip() == "":
            raise ValueError(
                f"{meta} line {n} has `{column}` {row[column]!r}: give every image an integer label, or drop the column"
            )
        labels[Path(row["file_name"]).as_posix()] = int(row[column])
    missing = [f for f in files if Path(f).relative_to(folder).as_posix() not in labels]
    if missing:
        raise ValueError(
            f"{meta} has no row for {Path(missing[0]).relative_to(folder)} ({len(missing)} images without a `{column}`)"
        )
    return [labels[Path(f).relative_to(folder).as_posix()] for f in files]
