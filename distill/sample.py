"""One-step sampling from a saved ``OneStepGANPipeline`` directory.

    python distill/sample.py --pipeline runs/student/pipeline --prompts prompts.txt --seeds 0-3 --output_dir samples/

Image ``(prompt p, seed s)`` uses the noise ``torch.randn(shape, generator=torch.Generator().manual_seed(s))``
(the same per-sample convention as the pairs' ``seed`` column), so any pairs row can be reproduced
by passing its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from data_gen.noise import noise_for_seed
from data_gen.prompts import load_prompts
from distill.core.config import ConfigError, command, parse_config, require_positive
from distill.core.folders import describe
from students import OneStepGANPipeline
from students.export import is_one_step_folder
from teachers.loading import dtype_from_name

QUICKSTART_PIPELINE = "runs/quickstart/student/pipeline"  # where distill/digits/quickstart.sh puts its student


@dataclass
class SampleConfig:
    pipeline: str = field(default="", metadata={"help": "directory written by train_student.py (…/pipeline)"})
    prompts: str = field(default="", metadata={"help": "prompt file (.txt/.jsonl/.csv/.parquet) or datasets name"})
    prompt: Optional[str] = field(default=None, metadata={"help": "a single prompt instead of a file"})
    prompt_column: str = field(default="prompt", metadata={"help": "column of table prompt sources"})
    seeds: str = field(default="0", metadata={"help": "per-image seeds: '0-7' or '1,5,9'"})
    output_dir: str = field(default="samples", metadata={"help": "where PNGs (and grid.png) are written"})
    resolution: Optional[int] = field(default=None, metadata={"help": "image side (default: the student's)"})
    batch_size: int = field(default=8, metadata={"help": "images per generator call"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.strip().split("-", 1)
                seeds += list(range(int(lo), int(hi) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"bad seeds {text!r}: use a range '0-7' or a list '1,5,9'") from None
    if not seeds:
        raise ConfigError("no seeds given: use e.g. --seeds 0-7")
    return seeds


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; an unknown or unavailable device is one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for, but CUDA is not available here (torch {torch.__version__}): use --device "
            "cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


@command
def main() -> None:
    cfg = parse_config(SampleConfig, description=__doc__)
    require_positive(cfg, "batch_size")
    if cfg.resolution is not None:
        require_positive(cfg, "resolution")
    device = resolve_device(cfg.device)

    # 1. Load: the prompts, the seeds and the pipeline.
    if not cfg.pipeline or not is_one_step_folder(cfg.pipeline):
        what = describe(cfg.pipeline) if cfg.pipeline else "is not set"
        raise ConfigError(
            f"pipeline {cfg.pipeline!r} {what}: pass a student's pipeline folder (train_student.py / train_gan.py: "
            f"OUTPUT_DIR/pipeline; the quickstart's: {QUICKSTART_PIPELINE})"
        )
    prompts = [cfg.prompt] if cfg.prompt else load_prompts(cfg.prompts, column=cfg.prompt_column)
    seeds = parse_seeds(cfg.seeds)
    pipe = OneStepGANPipeline.from_pretrained(cfg.pipeline, dtype=dtype_from_name(cfg.dtype)).to(device)

    # 2. Prepare: the noise shape for the resolution, one job per (prompt, seed).
    side = cfg.resolution or pipe.default_resolution()
    if side % pipe.vae_scale_factor:
        raise ConfigError(f"resolution {side} is not divisible by the VAE factor {pipe.vae_scale_factor}")
    shape = (pipe.student.latent_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 3. Loop: one pipeline call per batch of jobs, each image saved as it comes.
    images = []
    for b in tqdm(range(0, len(jobs), cfg.batch_size), desc="sample", unit="batch"):
        chunk = jobs[b : b + cfg.batch_size]
        noise = torch.stack([noise_for_seed(s, shape) for _, _, s in chunk])  # [N,C,h,w]
        batch = pipe([p for _, p, _ in chunk], latents=noise, output_type="pil").images
        for (i, _, s), image in zip(chunk, batch):
            image.save(out / f"{i:04d}-seed{s}.png")
        images += batch

    # 4. Save: the grid (one row per prompt, one column per seed).
    cols = len(seeds)
    make_image_grid(images, rows=len(images) // cols, cols=cols).save(out / "grid.png")
    print(f"{len(images)} images in {out.resolve()} (grid.png: one row per prompt, one column per seed)")


if __name__ == "__main__":
    main()
