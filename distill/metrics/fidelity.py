"""Fidelity to the teacher: how close the student's one-step output is to the teacher's ODE solution.

On held-out pairs (same noise, same prompt) the student latents are compared with the stored teacher
targets by E-LatentLPIPS (in latent space), LPIPS (decoded pixels) and PSNR (decoded pixels). All three
are 0 / 0 / capped for identical latents. Lower LPIPS and higher PSNR mean closer to the teacher.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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
        raise ValueError(f"student latents {tuple(pred_latents.shape)} and teacher targets {tuple(target_latents.shape)} differ in shape")
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
