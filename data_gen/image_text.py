"""Image–caption data for from-scratch text-to-image GAN training.

Sources (``open_image_text``): anything ``datasets.load_dataset`` opens, by hub name or local path: an
``imagefolder`` (images + ``metadata.jsonl`` / ``metadata.csv`` with a caption column), Parquet files,
webdataset ``.tar`` shards; ``streaming=True`` for sets that do not fit on disk; or a latent cache written
by ``distill/cache_latents.py`` (sharded Parquet of VAE latents + captions with ``latent_cache.json``).
Images of any size and mode are read as displayed (:func:`to_rgb`: EXIF orientation, transparency onto white,
16-bit greys scaled), centre-cropped and resized to a square ``resolution`` and returned in [-1, 1]; a caption
cell holding a list (COCO style) gives one of its captions, drawn per use. :func:`check_image_text` reads every
caption and image header of a map-style set up front, so that a bad row stops a run before it writes anything.

Which rows a process reads at which step is decided by the trainer (``distill/training/seeds.py``): a
map-style set is indexed, a stream is split by rank (``datasets.distributed.split_dataset_by_node``) and
read through a :class:`StreamCursor` whose position is saved with each checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
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


def open_dataset(source: str, *, split: str = "train", streaming: bool = False, config_name: str | None = None):
    """A ``datasets`` split from a local folder (imagefolder with metadata, Parquet, webdataset, or a
    ``save_to_disk`` directory), a single ``.parquet`` / ``.tar`` file, or a hub name available offline; a folder
    or hub name that cannot be opened is one line saying what to pass. The one opener of image datasets
    (:func:`open_image_text`, latent-LPIPS training's labelled images)."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))  # save_to_disk output (not streamable: it is already memory-mapped)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    kwargs: dict[str, Any] = dict(split=split, streaming=streaming)
    if path.is_file():  # a single Parquet file or webdataset shard
        builder = {".parquet": "parquet", ".tar": "webdataset"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset file {path} is neither .parquet nor a webdataset .tar: pass a folder or a hub name"
            )
        args, kwargs = (builder,), dict(kwargs, data_files={split: str(path)})
    else:
        args = (str(path) if path.is_dir() else source,) + ((config_name,) if config_name else ())
    try:
        with _quiet_progress_bars():
            return datasets.load_dataset(*args, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, FileNotFoundError) and path.is_dir() and _metadata_files(path):
            raise ValueError(
                f"dataset {source}: a file its metadata names is missing ({first}): add the file or drop its "
                "line from the metadata"
            ) from None
        mixed = re.search(r"Column\(/([^)]*)\) changed from (\w+) to (\w+) in row (\d+)", first)
        if mixed and path.is_dir():  # a caption written as a number (or a list) among strings, in metadata.jsonl
            column, was, now, row = mixed.groups()
            files = ", ".join(str(p) for p in _metadata_files(path)) or str(path)
            raise ValueError(
                f"dataset {source}: column {column!r} of {files} holds a {now} at row {row} where the rows before "
                f"hold a {was}: a caption must be text (a string, or a list of strings): write it in quotes"
            ) from None
        raise ValueError(
            f"cannot open dataset {source!r} ({first}): pass a local folder (imagefolder with metadata.jsonl / csv, "
            "Parquet, webdataset .tar) or a datasets hub name that is available offline"
        ) from None


def open_image_text(
    source: str,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    streaming: bool = False,
    config_name: str | None = None,
):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) of (image, caption) rows.

    Images stay undecoded (``{"path", "bytes"}``) so that :func:`load_image` can name the file that fails.
    A latent cache is opened with its own columns (``latents``, ``caption``); the column arguments then do not
    apply. Missing columns are one line listing the columns there are.
    """
    import datasets

    if not source:
        raise ValueError(
            "no dataset given: set `dataset` to a hub name, an imagefolder / Parquet / webdataset folder, "
            "or a latent cache from distill/cache_latents.py"
        )
    path = Path(source)
    if is_latent_cache(path):
        manifest = read_latent_manifest(path)
        if manifest.get("format") != LATENT_FORMAT:
            raise ValueError(
                f"{path} is not a latent cache of this version ({manifest.get('format')!r}): re-run "
                "distill/cache_latents.py"
            )
        files = sorted(str(p) for p in (path / DATA_DIR).glob("train-*.parquet"))
        if len(files) != manifest["num_shards"]:
            raise ValueError(
                f"latent cache {path} is incomplete ({len(files)} of {manifest['num_shards']} shards): "
                "re-run distill/cache_latents.py with the same arguments to finish it"
            )
        ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
        image_column, caption_column = LATENT_COLUMN, CAPTION_COLUMN
    else:
        ds = open_dataset(source, split=split, streaming=streaming, config_name=config_name)
    columns = list(ds.column_names or next(iter(ds)).keys())
    if (
        caption_column not in columns
        and path.is_dir()
        and image_column in columns
        and set(columns) <= {image_column, "label"}
    ):
        example = '{"file_name": "0001.png", "text": "a photo of ..."}'
        fix = (
            f"add a caption column to its metadata, e.g. {example} per line"
            if _metadata_files(path)
            else f"put a metadata.jsonl next to the images, one line per image such as {example} (or a metadata.csv "
            "with "
            "file_name and text columns)"
        )
        raise ValueError(f"dataset {source} has images but no captions (columns: {', '.join(columns)}): {fix}")
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in columns:
            raise ValueError(
                f"{kind} column {column!r} is not in dataset {source} (columns: {', '.join(columns)}): "
                f"set `{kind}_column` to one of them"
            )
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _quiet_progress_bars():
    """``datasets``' progress bars only on a terminal: in a log (or a test) an error stays the one line on stderr."""
    import datasets

    if sys.stderr.isatty() or datasets.are_progress_bars_disabled():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def quiet():
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            datasets.enable_progress_bars()

    return quiet()


def _metadata_files(folder: Path) -> list[Path]:
    return [
        p
        for pattern in ("metadata.*", "*/metadata.*")
        for p in folder.glob(pattern)
        if p.suffix in (".jsonl", ".csv", ".parquet")
    ]


def to_rgb(image):
    """A PIL image of any mode -> RGB, as a viewer shows it: EXIF orientation applied; transparency (an alpha band,
    a palette's transparent entries, a tRNS colour) composited onto white rather than dropped (the colours under
    alpha 0 are arbitrary); 16- and 32-bit greys (``I;16``, ``I``, ``F``) scaled to 8 bits rather than clipped;
    CMYK, palette, bilevel and the rest through PIL's conversion."""
    import numpy as np
    from PIL import Image, ImageOps

    if image.getexif().get(0x0112, 1) != 1:  # an EXIF orientation (phone photos): turn the pixels as viewers do
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":  # I;16 (16-bit PNG), I;16B / L, I (32-bit), F (float)
        values = np.asarray(image, dtype=np.float64)
        key = image.info.get("transparency")
        if image.mode.startswith("I;16"):
            scale = 255 / 65535
        elif image.mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:  # 32-bit integers: 16-bit data when above 255 (older PIL opened 16-bit PNGs as I)
            scale = 255 / 65535 if values.size and values.max() > 255 else 1.0
        grey = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")))
        image = grey
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")  # a palette or tRNS colour with transparency becomes alpha here
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(value: Any):
    """A dataset image cell (``{"path", "bytes"}`` or a file path) -> (PIL image, opened lazily: header only; its
    path)."""
    from PIL import Image

    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])), path
    return Image.open(path), path


def _unreadable(exc: BaseException, *, where: str, path) -> ValueError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return ValueError(
        f"image of {where} ({path or 'inline bytes'}) cannot be read ({type(exc).__name__}: {detail}): replace or "
        "remove it"
    )


def _read_errors():
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


def load_image(value: Any, *, where: str):
    """A dataset image cell (PIL image, ``{"path", "bytes"}`` or a file path) -> RGB PIL image (:func:`to_rgb`); an
    unreadable one is a one-line error naming ``where`` (the row) and the file."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return to_rgb(value)
    path = value.get("path") if isinstance(value, dict) else value
    try:
        image, path = _open_image(value)
        image.load()
        return to_rgb(image)
    except _read_errors() as exc:
        raise _unreadable(exc, where=where, path=path) from None


def _caption_text(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value if v is not None)
    )


def _caption_ok(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(v is not None and str(v).strip() for v in value)
    return value is not None and bool(str(value).strip())


def check_image_text(
    ds, *, source: str, image_column: str | None, caption_column: str, first_row: int = 0, chunk: int = 1024
) -> None:
    """Every row of a map-style set has a caption (a string, or a list with one, that is not blank) and an image
    whose header reads (``image_column`` None: no images, e.g. a latent cache); else one line naming the first bad
    row and its file, and how many more there are. Headers only (a few bytes per file): an image damaged past its
    header is found when it is decoded (:func:`load_image`)."""
    columns = [c for c in (image_column, caption_column) if c is not None]
    empty, unreadable = [], []
    first_error = None
    row = first_row  # the number of ds's first row in the whole set (ds: a contiguous share of it)
    for batch in ds.select_columns(columns).iter(batch_size=chunk):
        images = batch[image_column] if image_column is not None else [None] * len(batch[caption_column])
        for cell, caption in zip(images, batch[caption_column]):
            path = (cell.get("path") if isinstance(cell, dict) else cell) if cell is not None else None
            if caption is not None and not _caption_text(caption):
                raise ValueError(
                    f"dataset {source}: row {row}{f' ({path})' if path else ''} has a caption of type "
                    f"{type(caption).__name__} in column {caption_column!r} ({caption!r:.40}): a caption must be text "
                    "(a string, or a list of strings); is caption_column the right column?"
                )
            if not _caption_ok(caption):
                empty.append((row, path))
            if cell is not None:
                try:
                    image, _ = _open_image(cell)
                    image.close()
                except _read_errors() as exc:
                    unreadable.append(row)
                    first_error = first_error or _unreadable(exc, where=f"row {row}", path=path)
            row += 1
    if unreadable:
        more = f" ({len(unreadable) - 1} more unreadable images)" if len(unreadable) > 1 else ""
        raise ValueError(f"dataset {source}: {first_error}{more}")
    if empty:
        (row, path), more = empty[0], f" ({len(empty) - 1} more rows with an empty caption)" if len(empty) > 1 else ""
        raise ValueError(
            f"dataset {source}: row {row}{f' ({path})' if path else ''} has an empty caption in column "
            f"{caption_column!r}{more}: fill it in or drop the row"
        )


def image_transform(resolution: int):
    """PIL image -> [3, resolution, resolution] float in [-1, 1]: shorter side resized (antialiased), centre crop."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(resolution),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


def pick_caption(value: Any, *, generator: torch.Generator | None, where: str) -> str:
    """A caption cell -> one caption: a string as it is, one of a list's captions drawn with ``generator``."""
    if isinstance(value, (list, tuple)):
        value = [v for v in value if v is not None and str(v).strip()] or [""]
        value = value[int(torch.randint(len(value), (1,), generator=generator))]
    if value is None or not str(value).strip():
        raise ValueError(f"{where} has an empty caption: fill it in or drop the row")
    return str(value)


def rows_to_batch(
    rows: list[dict],
    *,
    image_column: str,
    caption_column: str,
    transform,
    generator: torch.Generator | None,
    where: list[str],
) -> tuple[torch.Tensor, list[str]]:
    """Rows -> (samples [N,...] float32, captions). Samples are images through ``transform`` or, from a latent
    cache, the stored latents."""
    if image_column == LATENT_COLUMN:
        samples = torch.stack([torch.as_tensor(r[image_column], dtype=torch.float32) for r in rows])
    else:
        samples = torch.stack([transform(load_image(r[image_column], where=w)) for r, w in zip(rows, where)])
    captions = [pick_caption(r[caption_column], generator=generator, where=w) for r, w in zip(rows, where)]
    return samples, captions


def read_rows(
    ds, indices: list[int], *, image_column: str, caption_column: str, transform, generator: torch.Generator | None
) -> tuple[torch.Tensor, list[str]]:
    """Rows ``indices`` of a map-style dataset as a batch (see :func:`rows_to_batch`)."""
    columns = ds[list(indices)] if image_column != LATENT_COLUMN else ds.with_format("numpy")[list(indices)]
    rows = [
        {image_column: columns[image_column][j], caption_column: columns[caption_column][j]}
        for j in range(len(indices))
    ]
    return rows_to_batch(
        rows,
        image_column=image_column,
        caption_column=caption_column,
        transform=transform,
        generator=generator,
        where=[f"row {i}" for i in indices],
    )


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
                    raise ValueError(
                        "the streaming dataset has no rows for this process: use fewer processes or more shards"
                    ) from None
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
    caption_feature = (
        datasets.Sequence(datasets.Value("string"))
        if isinstance(captions[0], (list, tuple))
        else datasets.Value("string")
    )
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            LATENT_COLUMN: datasets.Array3D(shape=latents.shape[1:], dtype="float16"),
            CAPTION_COLUMN: caption_feature,
        }
    )
    ds = datasets.Dataset.from_dict(
        {"index": list(map(int, indices)), LATENT_COLUMN: latents, CAPTION_COLUMN: list(captions)}, features=features
    )
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
