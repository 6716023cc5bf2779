"""Encode an image–caption dataset with a VAE once and store the latents as a Parquet dataset.

    accelerate launch distill/cache_latents.py --dataset DIR_OR_HUB_NAME --vae
    stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --resolution 512 --output_dir runs/latents-512

From-scratch GAN training re-encodes every real image at every epoch otherwise, most of its compute at
small generator sizes. Rows keep their dataset order (``index``), with ``latents`` ([C,h,w], float16,
VAE-scaled) and ``caption`` (as in the source: a string or a list). Shards are written under a temporary
name and renamed when complete, split across processes; re-running the same command finishes only the
missing shards; ``latent_cache.json`` (what made the cache) is written last. ``train_gan.py --dataset
OUTPUT_DIR`` reads it (``space: latent`` with the same VAE and resolution).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data_gen.image_text import (
    LATENT_MANIFEST,
    image_transform,
    latent_shard_path,
    open_image_text,
    read_rows,
    write_latent_manifest,
    write_latent_shard,
)
from distill.core.config import ConfigError, command, config_dict, parse_config, require_positive
from distill.core.lock import locked


@dataclass
class CacheConfig:
    dataset: str = field(
        default="", metadata={"help": "datasets hub name or local folder (imagefolder + metadata, Parquet, webdataset)"}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    image_column: str = field(default="image", metadata={"help": "image column"})
    caption_column: str = field(default="text", metadata={"help": "caption column"})
    resolution: int = field(default=256, metadata={"help": "image side in pixels (centre crop + resize)"})
    vae: str = field(default="", metadata={"help": "diffusers model path or hub id holding the AutoencoderKL"})
    vae_subfolder: Optional[str] = field(default="vae", metadata={"help": "subfolder of `vae` (null / . for the root)"})
    latent_sampling: str = field(
        default="mode",
        metadata={"help": "mode or sample (seeded per row) of the VAE posterior", "choices": ("mode", "sample")},
    )
    seed: int = field(default=0, metadata={"help": "seed of latent_sampling=sample"})
    batch_size: int = field(default=32, metadata={"help": "images per VAE call"})
    shard_size: int = field(default=4096, metadata={"help": "rows per Parquet shard (the unit of resumption)"})
    output_dir: str = field(default="runs/latents", metadata={"help": "the cache folder"})


@command
def main() -> None:
    cfg = parse_config(CacheConfig, description=__doc__)
    if not cfg.dataset or not cfg.vae:
        raise ConfigError("set `dataset` and `vae` (see --help)")
    require_positive(cfg, "resolution", "batch_size", "shard_size")
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    accelerator = Accelerator()
    out = Path(cfg.output_dir)
    with locked(
        out,
        purpose="cache_latents",
        is_main_process=accelerator.is_main_process,
        broadcast=lambda x: broadcast_object_list([x])[0],
    ):
        run(cfg, accelerator=accelerator, out=out)
    accelerator.end_training()


def run(cfg: CacheConfig, *, accelerator, out: Path) -> None:
    from distill.core.pretrained import load_vae
    from students.latents import scale_latents, vae_scale_factor

    # 1. Load: the dataset (undecoded images), the VAE; refuse a folder made with other settings.
    ds = open_image_text(
        cfg.dataset,
        split=cfg.split,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        config_name=cfg.dataset_config,
    )
    settings = {k: v for k, v in config_dict(cfg).items() if k not in ("batch_size", "output_dir")}
    progress = out / ".cache_settings.json"  # a started cache's settings, until its manifest is written
    done = json.loads((out / LATENT_MANIFEST).read_text())["source"] if (out / LATENT_MANIFEST).is_file() else None
    started = json.loads(progress.read_text()) if progress.is_file() else None
    if (done or started or settings) != settings:
        raise ValueError(
            f"{out} holds a latent cache made with other settings: re-run with those, or choose a new output_dir"
        )
    if done is not None:
        accelerator.print(f"{out} already holds this latent cache: nothing to do")
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    vae = load_vae(cfg.vae, subfolder=cfg.vae_subfolder).to(accelerator.device)
    if cfg.resolution % vae_scale_factor(vae):
        raise ValueError(f"resolution {cfg.resolution} is not divisible by the VAE factor {vae_scale_factor(vae)}")
    transform = image_transform(cfg.resolution)

    # 2. Encode: shard k on process k mod N, skipping finished shards.
    total = (len(ds) + cfg.shard_size - 1) // cfg.shard_size
    for k in range(accelerator.process_index, total, accelerator.num_processes):
        path = latent_shard_path(out, k, total)
        if path.is_file():
            continue
        indices = list(range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(ds))))
        latents, captions = [], []
        for b in range(0, len(indices), cfg.batch_size):
            idx = indices[b : b + cfg.batch_size]
            images, _ = read_rows(
                ds,
                idx,
                image_column=cfg.image_column,
                caption_column=cfg.caption_column,
                transform=transform,
                generator=None,
            )
            with torch.no_grad():
                dist = vae.encode(images.to(accelerator.device, vae.dtype)).latent_dist
                gen = torch.Generator().manual_seed(
                    cfg.seed * 1_000_003 + idx[0]
                )  # per-batch stream: any process count
                raw = dist.sample(generator=gen) if cfg.latent_sampling == "sample" else dist.mode()
            latents.append(scale_latents(raw, vae.config).float().cpu())
            captions += list(ds[idx][cfg.caption_column])
        write_latent_shard(path, indices=indices, latents=torch.cat(latents).numpy(), captions=captions)

    # 3. Save: the manifest, once every shard exists.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        side = cfg.resolution // vae_scale_factor(vae)
        write_latent_manifest(
            out,
            {
                "num_rows": len(ds),
                "num_shards": total,
                "latent_shape": [vae.config.latent_channels, side, side],
                "scaling_factor": vae.config.scaling_factor,
                "resolution": cfg.resolution,
                "source": settings,
            },
        )
        progress.unlink(missing_ok=True)
        print(f"cached {len(ds)} rows in {total} shard(s) in {out.resolve()}")


if __name__ == "__main__":
    main()
