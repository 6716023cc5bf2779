"""A teacher's identity: a hash of what decides its outputs, independent of how its path is spelled.

Only ``model_index.json`` and the folders of the components that shape the latents count (not the
safety checker, feature extractor or stray files such as a README). Config and tokenizer files are
hashed whole; weight files by size, their safetensors header (tensor
names, shapes, dtypes, metadata) and evenly spaced 1 MiB samples of their bytes, so even a 5 GB
pipeline is identified in well under a second while retrained or replaced weights are still noticed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
WHOLE_FILE_LIMIT = 64 * 2**20  # smaller weight files are hashed whole
SAMPLES, SAMPLE_SIZE = 32, 2**20
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # never used for latents


def resolve_teacher_folder(name_or_path: str, *, revision: str | None = None, variant: str | None = None) -> Path:
    """The local folder of a teacher: the path itself, or the hub snapshot (downloaded or from the cache)."""
    from diffusers import DiffusionPipeline

    from .loading import _model_index

    if not name_or_path:
        raise ValueError(
            "no teacher given: set `teacher` to a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a "
            "local folder"
        )
    _, local = _model_index(name_or_path, revision)  # one-line errors for a missing folder or an unreachable hub id
    if local:
        return Path(name_or_path)

    # What load_teacher's from_pretrained fetches (a cache hit once it has run); no safety checker.
    return Path(
        DiffusionPipeline.download(
            name_or_path, revision=revision, variant=variant, **{name: None for name in IGNORED_COMPONENTS}
        )
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if path.suffix not in WEIGHT_SUFFIXES or size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        if path.suffix == ".safetensors":  # 8-byte little-endian header length, then the JSON header
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, WHOLE_FILE_LIMIT)))
        for k in range(SAMPLES):
            fh.seek((size - SAMPLE_SIZE) * k // (SAMPLES - 1))
            h.update(fh.read(SAMPLE_SIZE))
    return "sampled:" + h.hexdigest()


def teacher_identity(folder: str | os.PathLike) -> dict:
    """``{"sha256": <digest of all files>, "files": {relative path: digest}}`` of a pipeline folder.

    Hidden files and folders (caches, locks) are skipped; symlinks (hub snapshots) are followed.
    """
    import json

    root = Path(folder)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{root} is not a diffusers pipeline folder (no model_index.json): pass a pipeline saved with "
            "save_pretrained"
        )
    components = [
        k
        for k, v in json.loads(index.read_text()).items()
        if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None and k not in IGNORED_COMPONENTS
    ]
    files = {"model_index.json": _file_digest(index)}
    for component in components:
        for path in sorted((root / component).rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            files[rel.as_posix()] = _file_digest(path)
    total = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {"sha256": total, "files": files}


def identity_changes(old: dict, new: dict) -> list[str]:
    """Files added, removed or changed between two :func:`teacher_identity` results."""
    a, b = old.get("files", {}), new.get("files", {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
