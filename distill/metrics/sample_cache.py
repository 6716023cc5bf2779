"""Evaluation samples cached as PNGs: ``samples_dir/{index:07d}.png`` plus a manifest of what made them.

Sample ``i`` uses prompt ``i`` (cycled) and noise from (seed, i); batches of consecutive indices are the
unit of work, split across processes, so the cache is the same for any process count and a killed run
resumes by making only the batches with a missing PNG.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from tqdm.auto import tqdm

from data_gen.noise import noise_for_indices
from data_gen.prompts import prompt_for_index

if TYPE_CHECKING:
    from distill.metrics.generation import Sampler

SAMPLES_FORMAT = "diffusion2gan-eval-samples/1"


def sample_path(samples_dir: Path, index: int) -> Path:
    return samples_dir / f"{index:07d}.png"


def folder_fingerprint(path: Path) -> str | None:
    """Hash of a pipeline folder's file names, sizes and modification times: a re-saved student is a new identity.
    The model card (README.md) is left out: evaluation itself writes its numbers there."""
    if not path.is_dir():
        return None  # a hub id: its name (and the hub's immutable revisions) identify it
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != "README.md"):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def check_samples_manifest(samples_dir: Path, identity: dict) -> None:
    path = samples_dir / "manifest.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diffs = [
        f"{k}: {old.get('identity', {}).get(k)!r} -> {v!r}"
        for k, v in identity.items()
        if old.get("identity", {}).get(k) != v
    ]
    if old.get("format") != SAMPLES_FORMAT or diffs:
        raise ValueError(
            f"{samples_dir} holds samples made with a different config ({'; '.join(diffs) or 'format'}); "
            "choose a new output_dir or delete the samples folder"
        )


def save_png(image: np.ndarray, path: Path) -> None:
    """Write atomically (hidden temporary name, then rename): a killed run leaves no half-written PNG."""
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def generate_samples(
    sampler: Sampler,
    *,
    chunks: list[range],
    prompts: list[str],
    seed: int,
    latent_shape: tuple[int, int, int],
    samples_dir: Path,
    progress=None,
) -> None:
    from distill.metrics.image_io import images_to_uint8

    for chunk in chunks:
        idx = list(chunk)
        noise, _ = noise_for_indices(seed=seed, indices=idx, shape=latent_shape)  # [N,C,h,w]
        images = images_to_uint8(sampler.images([prompt_for_index(prompts, i) for i in idx], noise))
        for i, img in zip(idx, images):
            save_png(img, sample_path(samples_dir, i))
        if progress is not None:
            progress.update(len(idx))


def fill_sample_cache(
    sampler: Sampler,
    *,
    samples_dir: Path,
    identity: dict,
    num_samples: int,
    batch_size: int,
    prompts: list[str],
    seed: int,
    latent_shape: tuple[int, int, int],
    is_main_process: bool,
    process_index: int,
    num_processes: int,
    barrier: Callable[[], None],
) -> None:
    """Make every missing sample, this process taking every ``num_processes``-th missing batch; all processes call
    it."""
    barrier()
    if is_main_process:
        (samples_dir / "manifest.json").write_text(
            json.dumps({"format": SAMPLES_FORMAT, "identity": identity}, indent=2) + "\n"
        )
    chunks = [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    todo = [c for c in chunks if not all(sample_path(samples_dir, i).is_file() for i in c)]
    cached = num_samples - sum(len(c) for c in todo)
    barrier()  # every process sees the same `todo` before anyone writes
    mine = todo[process_index::num_processes]
    if is_main_process and cached:
        print(f"resuming: {cached} of {num_samples} samples already in {samples_dir}")
    # No bar when every sample is cached (a resumed run): one stuck at 0 img would say work is pending.
    bar = tqdm(
        total=sum(len(c) for c in mine),
        unit="img",
        desc=f"samples (rank 0 of {num_processes})",
        disable=not is_main_process or not mine,
        dynamic_ncols=True,
    )
    generate_samples(
        sampler,
        chunks=mine,
        prompts=prompts,
        seed=seed,
        latent_shape=latent_shape,
        samples_dir=samples_dir,
        progress=bar,
    )
    bar.close()
    barrier()


def read_samples(samples_dir: Path, count: int):
    from distill.metrics.image_io import load_image

    for i in range(count):
        yield load_image(sample_path(samples_dir, i))


def save_grid(samples_dir: Path, count: int, path: Path) -> None:
    """The first ``count`` samples in a near-square grid, row-major."""
    from PIL import Image

    images = list(read_samples(samples_dir, count))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    Image.fromarray(grid).save(path)
