"""The pairs dataset: sharded Parquet rows (index, seed, prompt, noise, target; optionally the teacher's prompt
embeddings) plus a manifest.

Layout of a pairs directory (opens with ``datasets.load_dataset(dir, split="train")``)::

    manifest.json                       what made the rows (teacher, scheduler, steps, CFG, seed, ...)
    data/train-00000-of-00042.parquet   shard k holds indices [k*shard_size, (k+1)*shard_size)

A shard is written to a hidden temporary name and renamed when complete, so a killed run leaves
only whole shards behind and a rerun regenerates exactly the missing ones. The manifest records a
SHA-256 per shard, checked on resume and on load, so a shard damaged after it was written is named
instead of read. There is deliberately no
dataset card with a ``configs`` section: ``datasets`` then caches a local folder by its card alone and
would serve stale rows after a resumed run; without one it keys the cache on the shard files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
DATA_DIR = "data"
ARROW_CACHE = ".arrow-cache"  # load_pairs: datasets' Arrow copy of the shards
FORMAT = "diffusion2gan-pairs/1"
STORAGE_DTYPES = ("float16", "float32")
TEXT_DTYPE = "float16"  # stored prompt embeddings
SPLIT_FILE = "pairs_split.json"  # a training run's held-out split, in its run folder and exported pipeline


def num_shards(*, num_pairs: int, shard_size: int) -> int:
    return (num_pairs + shard_size - 1) // shard_size


def shard_indices(shard: int, *, num_pairs: int, shard_size: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_pairs))


def shard_path(output_dir: str | os.PathLike, shard: int, total: int) -> Path:
    return Path(output_dir) / DATA_DIR / f"train-{shard:05d}-of-{total:05d}.parquet"


def pair_features(latent_shape: tuple[int, int, int], dtype: str, text_shapes: dict[str, list[int]] | None = None):
    """``datasets.Features`` of a pairs row; ``noise``/``target`` are [C,H,W] arrays; ``text_shapes`` (column -> shape,
    see :func:`stored_text_shapes`): the teacher's prompt embeddings stored with the row, in float16."""
    from datasets import Array2D, Array3D, Features, List, Value

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not supported; choose one of {', '.join(STORAGE_DTYPES)}")
    features = {
        "index": Value("int64"),
        "seed": Value("int64"),
        "prompt": Value("string"),
        "noise": Array3D(shape=tuple(latent_shape), dtype=dtype),
        "target": Array3D(shape=tuple(latent_shape), dtype=dtype),
    }
    for name, shape in (text_shapes or {}).items():
        features[name] = (
            Array2D(shape=tuple(shape), dtype=TEXT_DTYPE)
            if len(shape) == 2
            else List(Value(TEXT_DTYPE), length=shape[0])
        )
    return Features(features)


def stored_text_shapes(manifest: dict[str, Any]) -> dict[str, list[int]] | None:
    """The prompt-embedding columns stored with the rows (``generate_pairs.py --store_prompt_embeds``) and their
    per-row shapes: ``prompt_embeds`` [L,D], with SDXL also ``pooled_prompt_embeds`` [P]; None if there are none."""
    stored = manifest.get("prompt_embeds")
    return dict(stored["columns"]) if stored else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir/data`` or fail with one line if it cannot be written."""
    out = Path(output_dir)
    try:
        (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out / DATA_DIR, prefix=".probe-"):
            pass
    except OSError as exc:
        raise PermissionError(
            f"output_dir {out} is not writable ({exc.strerror or exc}): choose a directory you can write to"
        ) from None


def holds_rows(output_dir: str | os.PathLike) -> bool:
    """Whether a finished shard exists in ``output_dir`` (a manifest without one binds nothing: a run that stopped
    before
    its first shard, refused or failed, leaves no rows a later run with other settings could mix with)."""
    return any((Path(output_dir) / DATA_DIR).glob("train-*.parquet"))


def check_manifest(output_dir: str | os.PathLike, *, config: dict[str, Any]) -> bool:
    """Refuse a directory made with another ``config`` (the manifest's row-defining keys), or shards without a manifest.

    True when the directory holds pairs of the same config (a resumed run); False for a new one, or a manifest whose
    run wrote no shard (it is replaced).
    """
    out = Path(output_dir)
    path = out / MANIFEST
    if path.exists() and not holds_rows(out):
        return False
    if not path.exists():
        orphans = sorted((out / DATA_DIR).glob("*.parquet"))
        if orphans:
            raise ValueError(
                f"{out} holds {len(orphans)} shard(s) ({orphans[0].name}, ...) but no {MANIFEST}: nothing says which "
                "teacher "
                f"and config made them; delete {out / DATA_DIR} (or move it away) or choose a new output_dir"
            )
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); move it away or choose a new output_dir") from None
    old_config = old.get("config", {})
    diffs = [  # a key only one side has (an option recorded only when used) differs too
        f"{k}: {old_config.get(k)!r} -> {config.get(k)!r}"
        for k in dict.fromkeys([*config, *old_config])
        if old_config.get(k) != config.get(k)
    ]
    if old.get("format") != FORMAT or diffs:
        raise ValueError(
            f"{out} already holds pairs made with a different config "
            f"({'; '.join(diffs) or 'format ' + str(old.get('format'))}); "
            "re-run with the original config to finish it, or choose a new output_dir"
        )
    return True


def write_manifest(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    out = Path(output_dir)
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{output_dir} is not a pairs directory (no {MANIFEST}): run distill/generate_pairs.py first"
        )
    return json.loads(path.read_text())


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written ``.tmp-*`` shards / manifests of killed runs (call only while holding the folder's lock)."""
    out = Path(output_dir)
    stale = [*(out / DATA_DIR).glob(".tmp-*"), *out.glob(f".{MANIFEST}.tmp-*")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def shard_checksum(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def completed_shards(
    output_dir: str | os.PathLike, *, num_pairs: int, shard_size: int, checksums: dict[str, str] | None = None
) -> set[int]:
    """Shards already on disk, each verified: against its recorded SHA-256 in ``checksums`` (file name -> digest)
    when there is one, else by reading it whole (a shard left by a killed run, not yet in the manifest)."""
    import pyarrow.parquet as pq

    checksums = checksums or {}
    total = num_shards(num_pairs=num_pairs, shard_size=shard_size)
    done = set()
    for k in range(total):
        path = shard_path(output_dir, k, total)
        if not path.exists():
            continue
        fix = f"delete it and re-run generate_pairs with the same config to regenerate it (`rm {path}`)"
        expected = len(shard_indices(k, num_pairs=num_pairs, shard_size=shard_size))
        recorded = checksums.get(path.name)
        if recorded is not None and shard_checksum(path) != recorded:
            raise ValueError(f"shard {path} is corrupt (its SHA-256 differs from the one in {MANIFEST}): {fix}")
        try:
            rows = pq.read_metadata(path).num_rows if recorded is not None else pq.read_table(path).num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses
            raise ValueError(
                f"shard {path} is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): {fix}"
            ) from None
        if rows != expected:
            raise ValueError(f"shard {path} has {rows} rows, expected {expected}: {fix}")
        done.add(k)
    return done


def record_checksums(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Add the SHA-256 of every finished shard not yet in ``manifest["shards"]`` (the main process, at the end)."""
    recorded = manifest.setdefault("shards", {})
    for path in sorted((Path(output_dir) / DATA_DIR).glob("train-*.parquet")):
        if path.name not in recorded:
            recorded[path.name] = shard_checksum(path)


def rows_fingerprint(manifest: dict[str, Any]) -> str:
    """Hash of what decides row ``i``'s content (not how many rows or shards there are, nor whether the prompt
    embeddings are stored too): pairs folders with the same fingerprint hold the same row at the same index."""
    cfg = {
        k: v
        for k, v in manifest.get("config", {}).items()
        if k not in ("num_pairs", "shard_size", "store_prompt_embeds")
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def heldout_split(num_pairs: int, *, holdout: int) -> tuple[range, range]:
    """The one definition of the held-out split: (training indices, held-out indices); the last ``holdout`` are held
    out."""
    if not 0 <= holdout <= num_pairs:
        raise ValueError(f"holdout {holdout} must be between 0 and the {num_pairs} pairs")
    return range(0, num_pairs - holdout), range(num_pairs - holdout, num_pairs)


def write_shard(
    path: str | os.PathLike,
    *,
    indices: list[int],
    seeds: list[int],
    prompts: list[str],
    noise: np.ndarray,  # [N,C,H,W]
    target: np.ndarray,  # [N,C,H,W]
    dtype: str,
    text: dict[str, np.ndarray] | None = None,  # column -> [N,...] prompt embeddings (stored_text_shapes)
) -> None:
    """Write one complete shard: a hidden temporary file renamed into place."""
    import datasets
    import pyarrow.parquet as pq

    path = Path(path)
    text = text or {}
    features = pair_features(tuple(noise.shape[1:]), dtype, {k: list(v.shape[1:]) for k, v in text.items()})
    ds = datasets.Dataset.from_dict(
        {
            "index": list(map(int, indices)),
            "seed": list(map(int, seeds)),
            "prompt": list(prompts),
            "noise": noise.astype(dtype),
            "target": target.astype(dtype),
            **{k: v.astype(TEXT_DTYPE) for k, v in text.items()},
        },
        features=features,
    )
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    # The Arrow table carries the datasets feature metadata, so load_dataset restores Array3D columns.
    pq.write_table(ds.data.table, tmp)
    os.replace(tmp, path)


def target_statistics(pairs, *, rows: int, max_rows: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the target latents of the first ``min(rows, max_rows)`` rows of a pairs
    dataset (``load_pairs``): the scale a from-scratch student's output is set to (``StyleGenerator``'s
    ``latent_mean`` / ``latent_std``). The same rows on every process, so the same numbers."""
    n = min(int(rows), int(max_rows))
    if n < 2:
        raise ValueError(f"target statistics need at least 2 training pairs; got {n}")
    targets = pairs.with_format("torch", columns=["target"])[:n]["target"].float()  # [n,C,H,W]
    return targets.mean(dim=(0, 2, 3)).tolist(), targets.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def load_pairs(output_dir: str | os.PathLike):
    """Open a finished pairs directory as a ``datasets.Dataset`` (split ``train``).

    Fails with one line if the directory is not a pairs dataset, is incomplete, or has a corrupt shard.
    """
    import datasets

    manifest = read_manifest(output_dir)
    cfg = manifest["config"]
    total = num_shards(num_pairs=cfg["num_pairs"], shard_size=cfg["shard_size"])
    done = completed_shards(
        output_dir, num_pairs=cfg["num_pairs"], shard_size=cfg["shard_size"], checksums=manifest.get("shards")
    )
    if len(done) != total:
        raise ValueError(
            f"pairs in {output_dir} are incomplete ({len(done)} of {total} shards): re-run generate_pairs with the "
            "same config to finish"
        )
    files = [str(shard_path(output_dir, k, total)) for k in range(total)]
    # datasets turns Parquet into a memory-mapped Arrow file once; keep that copy beside the shards (reused by
    # every later load, deleted with the folder) rather than as another hidden copy in ~/.cache per pairs folder.
    cache = Path(output_dir) / ARROW_CACHE
    cache_dir = str(cache) if os.access(output_dir, os.W_OK) else None  # a read-only folder: the default cache
    return datasets.load_dataset(
        "parquet",
        data_files={"train": files},
        split="train",
        cache_dir=cache_dir,
        features=pair_features(tuple(manifest["latent_shape"]), cfg["dtype"], stored_text_shapes(manifest)),
    )
