"""Image–caption data for from-scratch text-to-image GAN training.

Sources (``open_image_text``): anything ``datasets.load_dataset`` opens, by hub name or local path: an
``imagefolder`` (images + ``metadata.jsonl`` / ``metadata.csv`` with a caption column), Parquet files,
webdataset ``.tar`` shards; ``streaming=True`` for sets that do not fit on disk; or a latent cache written
by ``distill/cache_latents.py`` (sharded Parquet of VAE latents + captions with ``latent_cache.json``).
Images are centre-cropped and resized to a square ``resolution`` and returned in [-1, 1]; a caption cell
holding a list (COCO style) gives one of its captions, drawn per use.

Which rows a process reads at which step is decided by the trainer (``distill/training/seeds.py``): a
map-style set is indexed, a stream is split by rank (``datasets.distributed.split_dataset_by_node``) and
read through a :class:`StreamCursor` whose position is saved with each checkpoint.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

LATENT_MANIFEST = "latent_cache.json"
LATENT_FORMAT = "diffusion2gan-latents/1"
LATENT_COLUMN = "latents"
CAPTION_COLUMN = "caption"  # the caption column of a latent cache
DATA_DIR = "data"


def is_latent_cache(source: str | os.PathLike) -> bool:
    return (Path(source) / LATENT_MANIFEST).is_file()


def read_latent_manifest(source: str | os.PathLike) -> dict:
    return json.loads((Path(source) / LATENT_MANIFEST).read_text())


def open_image_text(source: str, *, split: str = "train", image_column: str = "image", caption_column: str = "text",
                    streaming: bool = False, config_name: str | None = None):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) of (image, caption) rows.

    Images stay undecoded (``{"path", "bytes"}``) so that :func:`load_image` can name the file that fails.
    A latent cache is opened with its own columns (``latents``, ``caption``); the column arguments then do not
    apply. Missing columns are one line listing the columns there are.
    """
    import datasets

    if not source:
        raise ValueError("no dataset given: set `dataset` to a hub name, an imagefolder / Parquet / webdataset folder, "
                         "or a latent cache from distill/cache_latents.py")
    path = Path(source)
    if is_latent_cache(path):
        manifest = read_latent_manifest(path)
        if manifest.get("format") != LATENT_FORMAT:
            raise ValueError(f"{path} is not a latent cache of this version ({manifest.get('format')!r}): re-run distill/cache_latents.py")
        files = sorted(str(p) for p in (path / DATA_DIR).glob("train-*.parquet"))
        if len(files) != manifest["num_shards"]:
            raise ValueError(f"latent cache {path} is incomplete ({len(files)} of {manifest['num_shards']} shards): "
                             "re-run distill/cache_latents.py with the same arguments to finish it")
        ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
        image_column, caption_column = LATENT_COLUMN, CAPTION_COLUMN
    else:
        kwargs: dict[str, Any] = dict(split=split, streaming=streaming)
        if path.is_file():  # a single Parquet file or webdataset shard
            builder = {".parquet": "parquet", ".tar": "webdataset"}.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"dataset file {path} is neither .parquet nor a webdataset .tar: pass a folder or a hub name")
            args, kwargs = (builder,), dict(kwargs, data_files={split: str(path)})
        else:
            args = (str(path) if path.is_dir() else source,) + ((config_name,) if config_name else ())
        try:
            ds = datasets.load_dataset(*args, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"cannot open dataset {source!r} ({first}): pass a local folder (imagefolder with metadata.jsonl / csv, "
                "Parquet, webdataset .tar) or a datasets hub name that is available offline"
            ) from None
    columns = list(ds.column_names or next(iter(ds)).keys())
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in columns:
            raise ValueError(f"{kind} column {column!r} is not in dataset {source} (columns: {', '.join(columns)}): "
                             f"set `{kind}_column` to one of them")
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def load_image(value: Any, *, where: str):
    """A dataset image cell (PIL image, ``{"path", "bytes"}`` or a file path) -> RGB PIL image; an unreadable one is
    a one-line error naming ``where`` (the row) and the file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = value.get("path") if isinstance(value, dict) else value
    try:
        if isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"image of {where} ({path or 'inline bytes'}) cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}): replace or remove it") from None


def image_transform(resolution: int):
    """PIL image -> [3, resolution, resolution] float in [-1, 1]: shorter side resized (antialiased), centre crop."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(), v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(resolution), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3),
    ])


def pick_caption(value: Any, *, generator: torch.Generator | None, where: str) -> str:
    """A caption cell -> one caption: a string as it is, one of a list's captions drawn with ``generator``."""
    if isinstance(value, (list, tuple)):
        value = [v for v in value if v] or [""]
        value = value[int(torch.randint(len(value), (1,), generator=generator))]
    if value is None or not str(value).strip():
        raise ValueError(f"{where} has an empty caption: fill it in or drop the row")
    return str(value)


def rows_to_batch(rows: list[dict], *, image_column: str, caption_column: str, transform, generator: torch.Generator | None,
                  where: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Rows -> (samples [N,...] float32, captions). Samples are images through ``transform`` or, from a latent
    cache, the stored latents."""
    if image_column == LATENT_COLUMN:
        samples = torch.stack([torch.as_tensor(r[image_column], dtype=torch.float32) for r in rows])
    else:
        samples = torch.stack([transform(load_image(r[image_column], where=w)) for r, w in zip(rows, where)])
    captions = [pick_caption(r[caption_column], generator=generator, where=w) for r, w in zip(rows, where)]
    return samples, captions


def read_rows(ds, indices: list[int], *, image_column: str, caption_column: str, transform,
              generator: torch.Generator | None) -> tuple[torch.Tensor, list[str]]:
    """Rows ``indices`` of a map-style dataset as a batch (see :func:`rows_to_batch`)."""
    columns = ds[list(indices)] if image_column != LATENT_COLUMN else ds.with_format("numpy")[list(indices)]
    rows = [{image_column: columns[image_column][j], caption_column: columns[caption_column][j]} for j in range(len(indices))]
    return rows_to_batch(rows, image_column=image_column, caption_column=caption_column, transform=transform,
                         generator=generator, where=[f"row {i}" for i in indices])


class StreamCursor:
    """This process's share of a streaming dataset (``split_dataset_by_node``: disjoint across ranks), read in
    order and restarted at the end of each pass; ``state_dict`` is the position (``datasets``' iterator state),
    so a resumed run continues where the checkpoint was taken, with no row read twice or skipped."""

    def __init__(self, ds, *, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.epoch = 0
        self._it = None
        self.read = 0  # rows taken in this pass, for error messages

    def take(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            if self._it is None:
                self._it = iter(self.ds)
            try:
                rows.append(next(self._it))
                self.read += 1
            except StopIteration:
                if self.read == 0:
                    raise ValueError("the streaming dataset has no rows for this process: use fewer processes or more shards") from None
                self.epoch += 1
                self.read = 0
                self.ds.set_epoch(self.epoch)
                self._it = None
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "stream": self.ds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.read = int(state["epoch"]), int(state["read"])
        self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(state["stream"])
        self._it = None


# ------------------------------------------------------------------------------------------------
# Latent cache layout (written by distill/cache_latents.py)


def latent_shard_path(output_dir: str | os.PathLike, shard: int, total: int) -> Path:
    return Path(output_dir) / DATA_DIR / f"train-{shard:05d}-of-{total:05d}.parquet"


def write_latent_shard(path: str | os.PathLike, *, indices: list[int], latents, captions: list) -> None:
    """One complete shard (``index``, ``latents`` [C,h,w] float16, ``caption`` as in the source: a string or a list),
    written to a hidden temporary name and renamed into place."""
    import datasets
    import numpy as np
    import pyarrow.parquet as pq

    latents = np.asarray(latents, dtype=np.float16)
    caption_feature = datasets.Sequence(datasets.Value("string")) if isinstance(captions[0], (list, tuple)) else datasets.Value("string")
    features = datasets.Features({"index": datasets.Value("int64"), LATENT_COLUMN: datasets.Array3D(shape=latents.shape[1:], dtype="float16"),
                                  CAPTION_COLUMN: caption_feature})
    ds = datasets.Dataset.from_dict({"index": list(map(int, indices)), LATENT_COLUMN: latents, CAPTION_COLUMN: list(captions)},
                                    features=features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(ds.data.table, tmp)  # the table carries the feature metadata: load_dataset restores Array3D
    os.replace(tmp, path)


def write_latent_manifest(output_dir: str | os.PathLike, manifest: dict) -> None:
    out = Path(output_dir)
    tmp = out / f".{LATENT_MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": LATENT_FORMAT, **manifest}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / LATENT_MANIFEST)
