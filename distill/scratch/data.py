"""Real samples for the from-scratch trainer: which rows a process reads at a micro-batch, as a batch on the device.

A map-style dataset (local folders, Parquet, latent caches, hub sets that fit on disk) is indexed by
:func:`distill.training.seeds.batch_indices`: a pure function of (seed, micro-batch, rank), so the processes
read disjoint rows, each epoch is a permutation, and a resumed run continues the same order with no
bookkeeping. A streaming dataset is split by rank and read in order through a cursor whose position is
saved with every checkpoint (all ranks' positions, gathered). Images are encoded with the VAE on the fly;
a latent cache skips that. :func:`check_real_data` reads every caption and image header of a map-style set
before the run takes its output folder, so that a bad row stops it with nothing written.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from data_gen.image_text import (
    CAPTION_COLUMN,
    LATENT_COLUMN,
    StreamCursor,
    check_image_text,
    image_transform,
    is_latent_cache,
    open_image_text,
    read_latent_manifest,
    read_rows,
    rows_to_batch,
)
from distill.scratch.phases import RealBatch
from distill.training.prefetch import Prefetch
from distill.training.seeds import batch_indices, step_generator


def check_cache(manifest: dict, *, dataset: str, resolution: int, vae_config) -> None:
    """A latent cache must come from this run's VAE (by its scaling factor and latent shape) at this resolution."""
    if vae_config is None:
        raise ValueError(
            f"{dataset} is a latent cache: train with space latent and the VAE that made it "
            f"({manifest['source']['vae']})"
        )
    made = (manifest["resolution"], manifest["scaling_factor"], manifest["latent_shape"][0])
    wanted = (resolution, vae_config.scaling_factor, vae_config.latent_channels)
    if made != wanted:
        raise ValueError(
            f"latent cache {dataset} was made at resolution {made[0]} with VAE {manifest['source']['vae']} (scaling "
            "factor "
            f"{made[1]:g}, {made[2]} channels), not resolution {wanted[0]} with this VAE (scaling factor "
            f"{wanted[1]:g}, "
            f"{wanted[2]} channels): match them or cache again"
        )


KEPT = "the checkpoints written so far are kept: fix it and re-run the same command to resume"


def check_real_data(cfg, *, rank: int = 0, world: int = 1, gather: Callable[[list], list] = lambda x: x):
    """Open ``cfg.dataset`` and check its rows (:func:`data_gen.image_text.check_image_text`: captions not blank, image
    headers readable), each process a contiguous share, the outcomes gathered (``accelerate.utils.gather_object``): a
    bad set is one ValueError on every process, before the run writes anything. Returns the opened dataset, for
    :class:`RealData`. A stream is only opened (its rows are checked as they are read)."""
    reason, ds = None, None
    try:
        ds = open_image_text(
            cfg.dataset,
            split=cfg.split,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            streaming=cfg.streaming,
            config_name=cfg.dataset_config,
        )
        if not cfg.streaming:
            cached = is_latent_cache(cfg.dataset)
            lo, hi = len(ds) * rank // world, len(ds) * (rank + 1) // world
            check_image_text(
                ds.select(range(lo, hi)),
                source=cfg.dataset,
                image_column=None if cached else cfg.image_column,
                caption_column=CAPTION_COLUMN if cached else cfg.caption_column,
                first_row=lo,
            )
    except ValueError as exc:
        reason = str(exc)
    reasons = [r for r in gather([reason]) if r is not None]
    if reasons:
        raise ValueError(reasons[0])
    return ds


class _ReadError:
    """A batch that could not be read in a DataLoader worker, carried to the training process as a value (re-raised
    there as one line: a worker's own exception would arrive wrapped in its traceback)."""

    def __init__(self, message: str):
        self.message = message


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch number -> (samples, captions) of this rank: what DataLoader workers prefetch."""

    def __init__(
        self,
        ds,
        *,
        seed: int,
        rank: int,
        world: int,
        batch_size: int,
        image_column: str,
        caption_column: str,
        transform,
    ):
        self.ds, self.seed, self.rank, self.world, self.batch_size = ds, seed, rank, world, batch_size
        self.columns, self.transform = (image_column, caption_column), transform

    def __getitem__(self, micro: int):
        idx = batch_indices(
            seed=self.seed,
            step=micro,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch_size,
            num_rows=len(self.ds),
        )
        try:
            return read_rows(
                self.ds,
                idx,
                image_column=self.columns[0],
                caption_column=self.columns[1],
                transform=self.transform,
                generator=step_generator(seed=self.seed, rank=self.rank, step=micro, purpose="caption"),
            )
        except ValueError as exc:  # an image damaged past its header, found when decoded
            return _ReadError(str(exc))


class RealData:
    """``data.batch(micro) -> RealBatch`` for consecutive global micro-batch numbers from ``start``.

    ``encode``: captions -> text conditioning; ``to_samples``: images -> generator-space samples (VAE encode).
    ``gather``: collects every rank's stream position at a checkpoint (``accelerate.utils.gather_object``).
    ``ds``: the set already opened (:func:`check_real_data`), else opened here."""

    def __init__(
        self,
        *,
        dataset: str,
        split: str,
        image_column: str,
        caption_column: str,
        streaming: bool,
        config_name: str | None,
        resolution: int,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        latent_sampling: str,
        encode: Callable,
        to_samples: Callable,
        device,
        gather: Callable[[list], list],
        vae_config=None,
        ds=None,
    ):
        self.ds = (
            ds
            if ds is not None
            else open_image_text(
                dataset,
                split=split,
                image_column=image_column,
                caption_column=caption_column,
                streaming=streaming,
                config_name=config_name,
            )
        )
        self.cached = is_latent_cache(dataset)
        if self.cached:
            check_cache(read_latent_manifest(dataset), dataset=dataset, resolution=resolution, vae_config=vae_config)
        self.columns = (LATENT_COLUMN, "caption") if self.cached else (image_column, caption_column)
        self.transform = image_transform(resolution)
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch_size
        self.latent_sampling = latent_sampling
        self.encode, self.to_samples, self.device, self.gather = encode, to_samples, device, gather
        self.cursor = StreamCursor(self.ds, rank=rank, world=world) if streaming else None
        self.prefetch = (
            None
            if streaming
            else Prefetch(
                _MicroBatches(
                    self.ds,
                    seed=seed,
                    rank=rank,
                    world=world,
                    batch_size=batch_size,
                    image_column=self.columns[0],
                    caption_column=self.columns[1],
                    transform=self.transform,
                ),
                num_workers=num_workers,
            )
        )
        if not streaming and len(self.ds) < batch_size * world:
            raise ValueError(
                f"dataset {dataset} has {len(self.ds)} rows, fewer than one step's batch "
                f"({batch_size} x {world} processes): lower batch_size"
            )

    def start(self, micro: int) -> None:
        """Read from micro-batch ``micro`` on (a resumed run's first); workers prefetch in order."""
        if self.prefetch is not None:
            self.prefetch.start(micro)

    def batch(self, micro: int) -> RealBatch:
        if self.cursor is not None:
            rows = self.cursor.take(self.batch_size)
            where = [
                f"streamed row {self.cursor.read - len(rows) + i} of pass {self.cursor.epoch} (rank {self.rank})"
                for i in range(len(rows))
            ]
            try:
                samples, captions = rows_to_batch(
                    rows,
                    image_column=self.columns[0],
                    caption_column=self.columns[1],
                    transform=self.transform,
                    generator=step_generator(seed=self.seed, rank=self.rank, step=micro, purpose="caption"),
                    where=where,
                )
            except ValueError as exc:
                raise ValueError(f"{exc} ({KEPT})") from None
        else:
            read = self.prefetch.read(micro)
            if isinstance(read, _ReadError):
                raise ValueError(f"{read.message} ({KEPT})")
            samples, captions = read
        samples = samples.to(self.device)
        if not self.cached:
            samples = self.to_samples(
                samples,
                sampling=self.latent_sampling,
                generator=step_generator(seed=self.seed, rank=self.rank, step=micro, purpose="vae"),
            )
        return RealBatch(samples=samples.float(), cond=self.encode(captions), captions=list(captions))

    def sample_statistics(self, rows: int = 256) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) of the first ``rows`` samples in the generator's space (VAE latents drawn with a
        fixed stream), the same on every process and on resume: what ``output_latent_stats`` sets the generator's output
        to."""
        try:
            if self.cursor is not None:
                taken = list(itertools.islice(iter(self.ds), rows))
                samples, _ = rows_to_batch(
                    taken,
                    image_column=self.columns[0],
                    caption_column=self.columns[1],
                    transform=self.transform,
                    generator=torch.Generator(),
                    where=[f"streamed row {i}" for i in range(len(taken))],
                )
            else:
                samples, _ = read_rows(
                    self.ds,
                    list(range(min(rows, len(self.ds)))),
                    image_column=self.columns[0],
                    caption_column=self.columns[1],
                    transform=self.transform,
                    generator=torch.Generator(),
                )
        except ValueError as exc:  # an image damaged past its header, found when decoded
            raise ValueError(f"{exc} ({KEPT})") from None
        if not self.cached:
            rng = step_generator(seed=self.seed, rank=0, step=0, purpose="statistics")
            samples = torch.cat(
                [
                    self.to_samples(chunk.to(self.device), sampling=self.latent_sampling, generator=rng)
                    for chunk in samples.split(self.batch_size)
                ]
            )
        per_channel = samples.float().transpose(0, 1).flatten(1)  # [C, rows*H*W]
        return per_channel.mean(dim=1).tolist(), per_channel.std(dim=1).clamp(min=1e-3).tolist()

    def distinct_captions(self, limit: int) -> list[str] | None:
        """Every distinct caption of a map-style set (each of a list cell's), or None when there are more than ``limit``
        or the set is streamed (its captions are not known ahead)."""
        if self.cursor is not None or limit <= 0:
            return None
        found: set[str] = set()
        for value in self.ds[self.columns[1]]:
            found.update(str(v) for v in value) if isinstance(value, (list, tuple)) else found.add(str(value))
            if len(found) > limit:
                return None
        return sorted(found)

    def some_captions(self, k: int) -> list[str]:
        """The distinct captions of ``k`` rows (a list cell: its first), in order: an indexed set's spread evenly over
        it (a folder sorted by subject shows every subject), a stream's first ``k``; reads nothing this process's
        stream position depends on."""
        n = len(self.ds) if self.cursor is None else 0
        rows = (
            itertools.islice(iter(self.ds), k)
            if self.cursor is not None
            else (self.ds[i] for i in sorted({j * n // k for j in range(k)} if n > k else range(n)))
        )
        found = []
        for row in rows:
            value = row[self.columns[1]]
            caption = str(value[0] if isinstance(value, (list, tuple)) else value)
            if caption not in found:
                found.append(caption)
        return found

    # Checkpointed with the run as JSON (TrainLoop.keep; state_dict is called on every process: it gathers).
    def state_dict(self) -> dict:
        return {"streams": self.gather([self.cursor.state_dict()]) if self.cursor is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.cursor is not None and state.get("streams"):
            self.cursor.load_state_dict(state["streams"][self.rank])
