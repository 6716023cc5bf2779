"""The VAE latent conventions of this project, in one place: the pipeline, the students and ``distill/`` use them
(``teachers/loading.py`` keeps its own ``vae_scale_factor``: teachers/ and students/ do not import each other).
Exported with the pipeline (``students/export.py`` flattens it into the pipeline file).

``latents`` are VAE-scaled, what the UNet and the pipelines' ``output_type="latent"`` use:
``(encoder output - shift_factor) * scaling_factor``."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """Image pixels per latent cell: 2 per VAE down-block after the first (1 without a VAE: pixel space)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def vae_factors(vae_config) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config; unset: 1 and 0 (SD1.x/SDXL VAEs have no shift)."""
    return float(getattr(vae_config, "scaling_factor", None) or 1.0), float(
        getattr(vae_config, "shift_factor", None) or 0.0
    )


def scale_latents(raw: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE-encoder output -> VAE-scaled latents (what the UNet and the pipelines' ``output_type="latent"`` use)."""
    scale, shift = vae_factors(vae_config)
    return (raw - shift) * scale


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE-scaled latents -> the VAE decoder's input (the inverse of :func:`scale_latents`)."""
    scale, shift = vae_factors(vae_config)
    return latents / scale + shift


def decode_vae(vae: AutoencoderKL | None, latents: torch.Tensor) -> torch.Tensor:
    """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1] (no VAE: the input is already the image).

    A float16 VAE whose config sets ``force_upcast`` (SDXL's: its fp16 activations overflow into NaN /
    black images) decodes in float32 and is cast back afterwards, as diffusers' SDXL pipeline does.
    """
    if vae is None:  # a pixel-space generator: its output is the image
        return latents.float()
    raw = unscale_latents(latents.float(), vae.config)
    if not (vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
        return vae.decode(raw.to(vae.dtype)).sample
    vae.to(torch.float32)
    try:
        return vae.decode(raw).sample
    finally:
        vae.to(torch.float16)
