"""Fidelity to the teacher: how close the student's one-step output is to the teacher's ODE solution.

On held-out pairs (same noise, same prompt) the student latents are compared with the stored teacher
targets by E-LatentLPIPS (in latent space), LPIPS (decoded pixels) and PSNR (decoded pixels). All three
are 0 / 0 / capped for identical latents. Lower LPIPS and higher PSNR mean closer to the teacher.
:func:`fidelity_metrics` measures one batch; :func:`compute_fidelity` runs a student or a teacher (a
:class:`~distill.metrics.generation.Sampler`) over a held-out slice of a pairs folder and averages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from distill.metrics import TEST_ONLY

if TYPE_CHECKING:
    from distill.metrics.generation import Sampler

PSNR_CAP_DB = 100.0  # identical images would give +inf, which JSON cannot hold; MSE is floored at 1e-10


def psnr(pred_images: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR ``[N]`` in dB of images ``[N,3,H,W]`` in [-1, 1] (peak 1 on the [0, 1] scale)."""
    x = (pred_images.float().clamp(-1, 1) + 1) / 2
    y = (target_images.float().clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).mean(dim=(1, 2, 3)).clamp_min(10 ** (-PSNR_CAP_DB / 10))
    return -10 * torch.log10(mse)


@torch.no_grad()
def fidelity_metrics(
    pred_latents: torch.Tensor,  # [N,C,h,w] student output, VAE-scaled
    target_latents: torch.Tensor,  # [N,C,h,w] teacher ODE solution, VAE-scaled
    *,
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent_lpips: nn.Module | None = None,
    pixel_lpips: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample ``e_latent_lpips``, ``lpips`` and ``psnr`` (each ``[N]``; a metric is left out when its net is None).

    decode: VAE-scaled latents -> images ``[N,3,H,W]`` in [-1, 1]. latent_lpips: e.g.
    ``ELatentLPIPS(net, augment=None, l1_weight=0.0)`` (deterministic). pixel_lpips: an ``lpips.LPIPS``-style
    net taking two image batches in [-1, 1]; images are clamped to [-1, 1] first, like the saved images.
    """
    if pred_latents.shape != target_latents.shape:
        raise ValueError(
            f"student latents {tuple(pred_latents.shape)} and teacher targets {tuple(target_latents.shape)} differ "
            "in shape"
        )
    out = {}
    if latent_lpips is not None:
        out["e_latent_lpips"] = latent_lpips(pred_latents, target_latents).float().flatten().cpu()
    pred = decode(pred_latents).float().clamp(-1, 1)
    target = decode(target_latents).float().clamp(-1, 1)
    if pixel_lpips is not None:
        dtype = next(pixel_lpips.parameters()).dtype
        out["lpips"] = pixel_lpips(pred.to(dtype), target.to(dtype)).float().flatten().cpu()
    out["psnr"] = psnr(pred, target).cpu()
    return out


# ------------------------------------------------------------------------------------------------
# Over held-out pairs

# Pixel LPIPS trunks: torchvision-pretrained, none (skip the metric) or random (tests).
PIXEL_LPIPS_CHOICES = ("vgg", "alex", "none", TEST_ONLY)


def fidelity_positions(*, start: int, count: int, num_rows: int) -> list[int]:
    """Row positions (in index order) of the held-out pairs: Python-style start, then ``count`` rows (0: to the end)."""
    start = start + num_rows if start < 0 else start
    start = max(start, 0)
    stop = num_rows if count == 0 else min(start + count, num_rows)
    return list(range(start, stop))


def check_heldout(*, pipeline: str, pairs: str, fidelity_start: int, fidelity_count: int) -> None:
    """Refuse fidelity rows that the student in ``pipeline`` trained on (per its recorded ``pairs_split.json``).

    Pairs folders with the same rows fingerprint hold the same row at the same index, so the check also
    covers a copy of the training pairs or a longer run of the same generation config.
    """
    import json
    from pathlib import Path

    from data_gen.pairs import SPLIT_FILE, read_manifest, rows_fingerprint

    record_path = Path(pipeline) / SPLIT_FILE
    if not record_path.is_file():
        return  # a teacher, or a student trained elsewhere: nothing says which rows it saw
    record = json.loads(record_path.read_text())
    manifest = read_manifest(pairs)
    if record.get("rows_fingerprint") != rows_fingerprint(manifest):
        return  # other rows than the ones it trained on
    rows = fidelity_positions(start=fidelity_start, count=fidelity_count, num_rows=int(manifest["count"]))
    lo, hi = record["train_indices"]
    seen = [i for i in rows if lo <= i < hi]
    if seen:
        held_lo, held_hi = record["heldout_indices"]
        raise ValueError(
            f"fidelity rows {rows[0]}..{rows[-1]} of {pairs} include {len(seen)} pairs the student trained on "
            f"(it held out indices {held_lo}..{held_hi - 1}): set fidelity_start to {held_lo - int(manifest['count'])} "
            "(minus the run's holdout) and fidelity_count to 0"
        )


def elatentlpips_name(name: str, *, vae_scaling_factor: float) -> str:
    """``auto`` -> the published net matching the VAE; anything else is returned unchanged."""
    if name != "auto":
        return name
    # The published SD1.5 and SD2.1 nets share the VAE convention; SDXL's VAE has its own scaling factor.
    return "sdxl" if abs(vae_scaling_factor - 0.13025) < 1e-6 else "sd15"


def fidelity_nets(
    *,
    elatentlpips: str,
    elatentlpips_download: bool,
    pixel_lpips: str,
    latent_channels: int,
    vae_scaling_factor: float,
    device,
):
    """(E-LatentLPIPS, pixel LPIPS) on ``device``; ``pixel_lpips`` is one of :data:`PIXEL_LPIPS_CHOICES`,
    ``random-tiny`` builds seeded random nets (tests only)."""
    from distill.losses import ELatentLPIPS, LatentLPIPSNet, build_pixel_lpips

    if elatentlpips == TEST_ONLY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = LatentLPIPSNet(latent_channels=latent_channels, stage_channels=(8, 8, 8, 8, 8))
        latent = ELatentLPIPS(net, augment=None, l1_weight=0.0)
    else:
        latent = ELatentLPIPS.from_pretrained(
            elatentlpips_name(elatentlpips, vae_scaling_factor=vae_scaling_factor),
            augment=None,
            l1_weight=0.0,
            download=elatentlpips_download,
        )
    if pixel_lpips == TEST_ONLY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pixel = build_pixel_lpips(pretrained_trunk=False)
    elif pixel_lpips == "none":  # e.g. the offline digits testbed: no ImageNet weights for the pixel trunk
        pixel = None
    else:  # vgg or alex: the config was checked against PIXEL_LPIPS_CHOICES
        pixel = build_pixel_lpips(net=pixel_lpips, pretrained_trunk=True)
    return latent.to(device), None if pixel is None else pixel.to(device)


def compute_fidelity(
    sampler: Sampler,
    *,
    pairs: str,
    fidelity_start: int,
    fidelity_count: int,
    batch_size: int,
    elatentlpips: str,
    elatentlpips_download: bool,
    pixel_lpips: str,
    device,
) -> tuple[dict, dict]:
    """Means of :func:`fidelity_metrics` over the selected pairs, and what was measured."""
    from data_gen.pairs import load_pairs, read_manifest

    manifest = read_manifest(pairs)
    ds = load_pairs(pairs).sort("index")
    rows = fidelity_positions(start=fidelity_start, count=fidelity_count, num_rows=ds.num_rows)
    if not rows:
        raise ValueError(
            f"fidelity_start {fidelity_start} / fidelity_count {fidelity_count} select none of the {ds.num_rows} "
            f"pairs in {pairs}"
        )
    latent_lpips, pixel_lpips_net = fidelity_nets(
        elatentlpips=elatentlpips,
        elatentlpips_download=elatentlpips_download,
        pixel_lpips=pixel_lpips,
        latent_channels=sampler.latent_channels,
        vae_scaling_factor=sampler.pipe.vae.config.scaling_factor,
        device=device,
    )
    values: dict[str, list[torch.Tensor]] = {}
    for b in tqdm(range(0, len(rows), batch_size), desc="fidelity", unit="batch", dynamic_ncols=True, leave=False):
        batch = ds.select(rows[b : b + batch_size]).with_format("numpy")
        noise = torch.from_numpy(np.stack(batch["noise"])).float()  # [N,C,h,w]
        target = torch.from_numpy(np.stack(batch["target"])).float()  # [N,C,h,w]
        pred = sampler.latents(list(batch["prompt"]), noise)
        out = fidelity_metrics(
            pred.to(device),
            target.to(device),
            decode=lambda z: sampler.decode(z).to(device),
            latent_lpips=latent_lpips,
            pixel_lpips=pixel_lpips_net,
        )
        for k, v in out.items():
            values.setdefault(k, []).append(v)
    means = {k: float(torch.cat(v).double().mean()) for k, v in values.items()}
    first, last = int(ds[rows[0]]["index"]), int(ds[rows[-1]]["index"])
    info = {
        "pairs": pairs,
        "rows": len(rows),
        "indices": [first, last],
        "teacher": manifest.get("teacher", {}),
        "pairs_config": {
            k: manifest.get("config", {}).get(k) for k in ("num_inference_steps", "guidance_scale", "scheduler")
        },
    }
    return means, info
