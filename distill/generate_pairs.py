"""Stage one: solve the teacher's ODE from stored noise and write (noise, prompt, target) pairs.

    accelerate launch distill/generate_pairs.py --config configs/pairs/sd15.yaml [--key value ...]

Rows are split across processes by shard; each row depends only on the config and its index, so the
result is the same for any number of processes or batch size, and re-running the same command after
a kill finishes only the missing shards. One run at a time writes a folder (``output_dir/.lock``); a
resumed run must have the same teacher (by content, see ``teachers.identity``) and row-defining config,
and every finished shard is checked against its recorded SHA-256. Diffusion2GAN §3.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from data_gen import pairs as pairs_io
from data_gen.hub import push_folder
from data_gen.noise import noise_for_indices
from data_gen.prompts import load_prompts, prompt_for_index, prompts_fingerprint
from distill.core.atomic import is_disk_full, no_space
from distill.core.config import (
    ConfigError,
    command,
    package_versions,
    parse_config,
    require_non_negative,
    require_positive,
    save_config,
)
from distill.core.lock import locked
from students.text import encode_sd3_text, encode_text
from teachers import SCHEDULERS, load_teacher, solve_ode
from teachers.identity import identity_changes, resolve_teacher_folder, teacher_identity
from teachers.loading import dtype_from_name, pipeline_family, resolve_scheduler, sd3_default_max_sequence_length


@dataclass
class PairsConfig:
    teacher: str = field(
        default="",
        metadata={
            "help": "hub id or local diffusers pipeline folder (SD1.x / SD2.x / SDXL / SD3)",
            "aliases": ["pretrained_model_name_or_path"],
        },
    )
    revision: Optional[str] = field(
        default=None, metadata={"help": "hub revision (branch, tag or commit) of the teacher"}
    )
    variant: Optional[str] = field(default=None, metadata={"help": "weights variant, e.g. fp16"})
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16"},
    )
    prompts: str = field(
        default="", metadata={"help": ".txt (one per line), .jsonl/.csv/.parquet file, or a datasets name"}
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "column holding the prompt in table / datasets sources"}
    )
    prompt_split: str = field(default="train", metadata={"help": "split of a datasets prompt source"})
    num_pairs: int = field(default=1000, metadata={"help": "rows to generate; prompts are cycled when fewer"})
    output_dir: str = field(default="runs/pairs", metadata={"help": "pairs directory (manifest.json + data/*.parquet)"})
    num_inference_steps: int = field(default=50, metadata={"help": "ODE solver steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (1 = off)"})
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "negative prompt used for CFG"})
    resolution: int = field(default=512, metadata={"help": "image side in pixels; must be divisible by the VAE factor"})
    batch_size: int = field(default=8, metadata={"help": "rows per teacher call, per process"})
    shard_size: int = field(default=1000, metadata={"help": "rows per Parquet shard (the unit of resumption)"})
    seed: int = field(default=0, metadata={"help": "base seed; row i's noise comes from hash(seed, i)"})
    scheduler: str = field(
        default="auto",
        metadata={
            "help": "ODE solver; auto: ddim for SD / SDXL, flow_euler (the teacher's own "
            "rectified-flow Euler, its shift settings kept) for SD3",
            "choices": (*SCHEDULERS, "auto"),
        },
    )
    max_sequence_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "SD3 only: T5 tokens per prompt (without T5: the zero "
            "tokens in their place); unset: the pipeline's default"
        },
    )
    dtype: str = field(
        default="float16", metadata={"help": "storage dtype of noise/target", "choices": tuple(pairs_io.STORAGE_DTYPES)}
    )
    store_prompt_embeds: bool = field(
        default=False,
        metadata={
            "help": "also store the teacher's prompt embeddings (SDXL, SD3: + pooled) with each row, in float16, so "
            "that train_student.py need not run the text encoder per step (~120 KB more per row for SD1.5, "
            "~320 KB for SDXL, ~2.7 MB for SD3 with 256 T5 tokens)"
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "upload the finished pairs as a Hub dataset (datasets.load_dataset(repo_id) opens it)"},
    )
    hub_dataset_id: str = field(
        default="", metadata={"help": "push_to_hub: the dataset repo id (user/name); empty: the output_dir's name"}
    )
    hub_token: Optional[str] = field(
        default=None, metadata={"help": "push_to_hub: a token (default: the one `hf auth login` stored)"}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "push_to_hub: create the repo private"})


def validate(cfg: PairsConfig) -> None:
    require_positive(cfg, "num_pairs", "num_inference_steps", "resolution", "batch_size", "shard_size")
    require_non_negative(cfg, "guidance_scale")  # diffusers reads any value <= 1 as CFG off; a negative one is a typo
    if cfg.max_sequence_length is not None and not 0 <= cfg.max_sequence_length <= 512:
        raise ConfigError(f"max_sequence_length must be in [0, 512] (SD3's T5 limit), got {cfg.max_sequence_length}")
    if cfg.teacher_dtype != "auto":
        dtype_from_name(cfg.teacher_dtype)


def generate_shards(
    teacher,
    *,
    cfg: PairsConfig,
    prompts: list[str],
    shards: list[int],
    out: Path,
    latent_shape: tuple[int, int, int],
    progress=None,
) -> None:
    """Generate and write the given shards (the whole per-process workload; also timed by the benchmark)."""
    storage = getattr(torch, cfg.dtype)
    total = pairs_io.num_shards(num_pairs=cfg.num_pairs, shard_size=cfg.shard_size)
    for k in shards:
        indices = list(pairs_io.shard_indices(k, num_pairs=cfg.num_pairs, shard_size=cfg.shard_size))
        noises, targets, seeds, texts = [], [], [], []
        for b in range(0, len(indices), cfg.batch_size):
            batch = indices[b : b + cfg.batch_size]
            if cfg.store_prompt_embeds:
                texts.append(
                    prompt_embeds(
                        teacher.pipe,
                        [prompt_for_index(prompts, i) for i in batch],
                        resolution=cfg.resolution,
                        max_sequence_length=cfg.max_sequence_length,
                    )
                )
            # Noise is rounded to the storage dtype first: the stored tensor is the one the teacher saw.
            noise, batch_seeds = noise_for_indices(seed=cfg.seed, indices=batch, shape=latent_shape, dtype=storage)
            target = solve_ode(
                teacher.pipe,
                prompts=[prompt_for_index(prompts, i) for i in batch],
                noise=noise.float(),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                negative_prompt=cfg.negative_prompt,
                max_sequence_length=cfg.max_sequence_length,
            )
            if not torch.isfinite(target).all():
                raise ValueError(
                    non_finite_message(
                        teacher.pipe.dtype, rows=(batch[0], batch[-1]), guidance_scale=cfg.guidance_scale
                    )
                )
            noises.append(noise)
            targets.append(target.to("cpu", storage))
            seeds += batch_seeds
            if progress is not None:
                progress.update(len(batch))
        pairs_io.write_shard(
            pairs_io.shard_path(out, k, total),
            indices=indices,
            seeds=seeds,
            prompts=[prompt_for_index(prompts, i) for i in indices],
            noise=torch.cat(noises).numpy(),
            target=torch.cat(targets).numpy(),
            dtype=cfg.dtype,
            text={k: torch.cat([t[k] for t in texts]).numpy() for k in texts[0]} if texts else None,
        )


def non_finite_message(dtype: torch.dtype, *, rows: tuple[int, int], guidance_scale: float) -> str:
    """Why rows came out non-finite and what to try: half precision overflowing, else the teacher or its settings."""
    where = f"teacher produced non-finite latents for rows {rows[0]}..{rows[1]}"
    if dtype != torch.float32:
        return f"{where} in {str(dtype).removeprefix('torch.')}: try teacher_dtype float32"
    return (
        f"{where} although it runs in float32 (guidance_scale {guidance_scale:g}): check the teacher's weights (its "
        "own "
        "pipeline gives the same), or lower guidance_scale; nothing of these rows was written"
    )


def row_bytes(manifest: dict) -> int:
    """Bytes one row takes in a shard (noise and target, stored prompt embeddings), for the full-disk message."""
    import numpy as np

    cells = 2 * int(np.prod(manifest["latent_shape"])) * np.dtype(manifest["config"]["dtype"]).itemsize
    text = (manifest.get("prompt_embeds") or {}).get("columns", {})
    return cells + sum(int(np.prod(shape)) * np.dtype(pairs_io.TEXT_DTYPE).itemsize for shape in text.values())


@contextlib.contextmanager
def full_disk_is_one_line(out: Path, *, manifest: dict, num_pairs: int, shard_size: int) -> Iterator[None]:
    """A write that does not fit (a shard, the manifest, the config record) becomes one line naming the folder and the
    room the missing shards need; the finished shards stay, and the same command resumes from them."""
    try:
        yield
    except BaseException as exc:
        if not is_disk_full(exc):
            raise
        total = pairs_io.num_shards(num_pairs=num_pairs, shard_size=shard_size)
        written = {p.name for p in (out / pairs_io.DATA_DIR).glob("train-*.parquet")}
        rows = sum(
            len(pairs_io.shard_indices(k, num_pairs=num_pairs, shard_size=shard_size))
            for k in range(total)
            if pairs_io.shard_path(out, k, total).name not in written
        )
        raise no_space(
            out,
            need_bytes=rows * row_bytes(manifest),
            what=f"the {rows} pairs still to write",
            kept=f"the {len(written)} finished shard(s) are kept and the same command resumes from them",
        ) from None


def prompt_embeds(
    pipe, prompts: list[str], *, resolution: int, max_sequence_length: int | None = None
) -> dict[str, torch.Tensor]:
    """The teacher's conditioning of ``prompts`` as stored with the rows: column -> [N,...] float16 on the CPU (what the
    student's ``encode_text`` computes, ``encode_sd3_text`` with ``max_sequence_length`` T5 tokens for an SD3 teacher;
    SDXL's time ids are not stored, they follow from the resolution)."""
    if hasattr(pipe, "transformer"):  # SD3: CLIP (+ T5) tokens and both pooled CLIP projections
        with torch.no_grad():
            cond = encode_sd3_text(
                prompts,
                tokenizer=pipe.tokenizer,
                text_encoder=pipe.text_encoder,
                tokenizer_2=pipe.tokenizer_2,
                text_encoder_2=pipe.text_encoder_2,
                tokenizer_3=pipe.tokenizer_3,
                text_encoder_3=pipe.text_encoder_3,
                max_sequence_length=max_sequence_length,
                joint_attention_dim=pipe.transformer.config.joint_attention_dim,
            )
    else:
        cond = encode_text(
            prompts,
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            resolution=(resolution, resolution),
        )
    columns = {"prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_prompt_embeds}
    return {k: v.to("cpu", getattr(torch, pairs_io.TEXT_DTYPE)) for k, v in columns.items() if v is not None}


@command
def main() -> None:
    cfg = parse_config(PairsConfig, description=__doc__)
    validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    accelerator = Accelerator()
    out = Path(cfg.output_dir)
    prompts = load_prompts(cfg.prompts, column=cfg.prompt_column, split=cfg.prompt_split)
    # One run per folder; a failed first run leaves no empty folder behind.
    with locked(
        out,
        purpose="generate_pairs",
        is_main_process=accelerator.is_main_process,
        broadcast=lambda x: broadcast_object_list([x])[0],
    ):
        pairs_io.ensure_writable(out)
        run(cfg, accelerator=accelerator, out=out, prompts=prompts)
    accelerator.end_training()


def resolve_sampler(cfg: PairsConfig, *, family: str) -> None:
    """Fill the family-dependent sampler keys in place (before the config is recorded): ``scheduler: auto``
    and, for SD3, an unset ``max_sequence_length`` (the pipeline's own default, read from its signature)."""
    try:
        cfg.scheduler = resolve_scheduler(cfg.scheduler, family=family)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if family == "sd3":
        if cfg.max_sequence_length is None:
            cfg.max_sequence_length = sd3_default_max_sequence_length()
    elif cfg.max_sequence_length is not None:
        raise ConfigError(f"max_sequence_length is for SD3 teachers (T5 tokens); this teacher is {family}: remove it")


def check_teacher(out: Path, identity: dict) -> None:
    """Name the teacher files that changed since the pairs in ``out`` were made (before the generic config check)."""
    path = out / pairs_io.MANIFEST
    if not path.exists() or not pairs_io.holds_rows(out):  # a run that wrote no shard binds no teacher
        return
    try:
        old = pairs_io.read_manifest(out).get("teacher", {}).get("identity")
    except ValueError:
        return  # unreadable: check_manifest names it
    if old is None:
        raise ValueError(
            f"{out} holds pairs made before teacher identities were recorded: they cannot be resumed safely; "
            "choose a new output_dir"
        )
    if old["sha256"] != identity["sha256"]:
        changed = identity_changes(old, identity)
        raise ValueError(
            f"{out} holds pairs of another teacher (changed: "
            f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): "
            "re-run with the teacher that made them, or choose a new output_dir"
        )


def run(cfg: PairsConfig, *, accelerator, out: Path, prompts: list[str]) -> None:
    """Generate the missing shards of ``out`` (its lock is held)."""
    # 1. Check: half-written files go; another teacher or other settings are refused (before the slow load).
    if accelerator.is_main_process:
        stale = pairs_io.remove_stale_temporaries(out)  # half-written shards of killed runs
        if stale:
            print(f"removed {len(stale)} half-written file(s) of an interrupted run from {out}")
    teacher_dtype = cfg.teacher_dtype
    if teacher_dtype == "auto":
        teacher_dtype = "float16" if accelerator.device.type == "cuda" else "float32"
    folder = resolve_teacher_folder(cfg.teacher, revision=cfg.revision, variant=cfg.variant)
    resolve_sampler(cfg, family=pipeline_family(str(folder)))
    teacher_id = teacher_identity(folder)
    identity = dataclasses.asdict(cfg)
    # Teacher and prompts count by content, not by how their paths are spelled; output_dir and batch_size change no row.
    for key in (
        "output_dir",
        "batch_size",
        "teacher",
        "revision",
        "prompts",
        "push_to_hub",
        "hub_dataset_id",
        "hub_token",
        "hub_private_repo",
    ):
        identity.pop(key)
    if not cfg.store_prompt_embeds:  # absent unless used: pairs made before the option resume as they were
        identity.pop("store_prompt_embeds")
    identity.update(
        teacher_dtype=teacher_dtype,
        prompts_sha256=prompts_fingerprint(prompts),
        num_prompts=len(prompts),
        teacher_sha256=teacher_id["sha256"],
    )
    # Every process checks before anyone writes, and before the slow teacher load.
    check_teacher(out, teacher_id)
    resumed = pairs_io.check_manifest(out, config=identity)
    old_checksums = pairs_io.read_manifest(out).get("shards", {}) if resumed else {}

    # 2. Load: the teacher pipeline with the configured scheduler and dtype.
    teacher = load_teacher(
        str(folder),
        revision=None,
        variant=cfg.variant,
        torch_dtype=dtype_from_name(teacher_dtype),
        scheduler=cfg.scheduler,
        device=accelerator.device,
    )
    latent_shape = teacher.latent_shape(cfg.resolution)

    # 3. Prepare: the manifest (written once, kept on resume) and this process's share of the missing shards.
    manifest = {
        "format": pairs_io.FORMAT,
        "config": identity,
        "teacher": {
            "name_or_path": cfg.teacher,
            "revision": cfg.revision,
            "family": teacher.family,
            "pipeline_class": type(teacher.pipe).__name__,
            "prediction_type": teacher.prediction_type,
            "identity": teacher_id,
        },
        "scheduler_config": dict(teacher.pipe.scheduler.config),
        "latents": teacher.latent_convention(),
        "latent_shape": list(latent_shape),
        "prompt_embeds": None
        if not cfg.store_prompt_embeds
        else {
            "columns": {
                k: list(v.shape[1:])
                for k, v in prompt_embeds(
                    teacher.pipe, [""], resolution=cfg.resolution, max_sequence_length=cfg.max_sequence_length
                ).items()
            },
            "dtype": pairs_io.TEXT_DTYPE,
            "text_encoder_dtype": teacher_dtype,
        },
        "count": cfg.num_pairs,
        "complete": False,
        "shards": dict(old_checksums),
        "versions": package_versions(
            "diffusion2gan-toolkit", "torch", "diffusers", "transformers", "accelerate", "datasets"
        ),
    }
    with full_disk_is_one_line(out, manifest=manifest, num_pairs=cfg.num_pairs, shard_size=cfg.shard_size):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not resumed:
            pairs_io.write_manifest(out, manifest)
            save_config(cfg, out / "generate_pairs.yaml")
        total = pairs_io.num_shards(num_pairs=cfg.num_pairs, shard_size=cfg.shard_size)
        done = pairs_io.completed_shards(
            out, num_pairs=cfg.num_pairs, shard_size=cfg.shard_size, checksums=old_checksums
        )
        accelerator.wait_for_everyone()  # everyone sees the same `done` before anyone writes a shard
        todo = [k for k in range(total) if k not in done][accelerator.process_index :: accelerator.num_processes]

        my_rows = sum(len(pairs_io.shard_indices(k, num_pairs=cfg.num_pairs, shard_size=cfg.shard_size)) for k in todo)
        if accelerator.is_main_process:  # on stdout too: a log that keeps only stdout still shows the stage started
            resuming = f"resuming with {len(done)} of {total} shards already in {out} (checked); " if done else ""
            print(
                f"pairs: {resuming}{my_rows} to solve on rank 0 of {accelerator.num_processes} "
                f"({cfg.num_inference_steps} "
                f"{cfg.scheduler} steps each) into {out}",
                flush=True,
            )
        bar = tqdm(
            total=my_rows,
            unit="pair",
            desc=f"pairs (rank 0 of {accelerator.num_processes})",
            disable=not accelerator.is_main_process or my_rows == 0,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        # 4. Loop: noise -> ODE -> one Parquet shard at a time (each written atomically).
        try:
            generate_shards(
                teacher, cfg=cfg, prompts=prompts, shards=todo, out=out, latent_shape=latent_shape, progress=bar
            )
        finally:
            bar.close()  # ends the progress line, so an error message starts on its own line

        # 5. Save: the manifest with every shard's checksum, complete once all shards exist.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finished = pairs_io.completed_shards(
                out, num_pairs=cfg.num_pairs, shard_size=cfg.shard_size, checksums=old_checksums
            )
            manifest["complete"] = len(finished) == total
            pairs_io.record_checksums(out, manifest)
            pairs_io.write_manifest(out, manifest)
            if manifest["complete"]:  # the record of the run that finished the folder (also after a failed first run)
                save_config(cfg, out / "generate_pairs.yaml")
            seconds = time.perf_counter() - start
            rate = f"{my_rows / max(seconds, 1e-9):.2f} pairs/s on rank 0" if my_rows else "nothing left to solve"
            print(
                f"{cfg.num_pairs} pairs in {out.resolve()} ({rate}); open with datasets.load_dataset({str(out)!r}, "
                "split='train')"
            )
            if cfg.push_to_hub and manifest["complete"]:
                url = push_folder(
                    out,
                    repo_id=cfg.hub_dataset_id or out.resolve().name,
                    repo_type="dataset",
                    token=cfg.hub_token,
                    private=cfg.hub_private_repo,
                    commit_message=f"{cfg.num_pairs} teacher pairs",
                )
                print(f"pushed to the Hub: {url}")
    accelerator.wait_for_everyone()  # nobody leaves (and the lock is not released) before the manifest is final


if __name__ == "__main__":
    main()
