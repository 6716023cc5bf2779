"""Solve the teacher's probability-flow ODE from given noise (Diffusion2GAN §3.1: the pairs).

The solve *is* the diffusers pipeline call with ``latents=noise`` and ``output_type="latent"``, so a
stored target equals what a user gets from ``pipe(prompt, latents=noise, ...)`` by construction:
prompt encoding, CFG, scheduler steps and SDXL's added conditioning all stay diffusers' own. For SD3
the same holds: ``StableDiffusion3Pipeline`` returns its latents before un-scaling, so targets of every
family are VAE-scaled latents, ``(vae latent - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from .loading import vae_scale_factor


@torch.no_grad()
def solve_ode(
    pipe: DiffusionPipeline,
    *,
    prompts: list[str],
    noise: torch.Tensor,  # [N,C,H,W] unit Gaussian
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
) -> torch.Tensor:
    """Teacher ODE solution ``[N,C,H,W]`` (VAE-scaled latents) for ``noise`` and ``prompts``.

    ``max_sequence_length``: SD3 only, the pipeline's argument of that name (T5 tokens, or the zero
    tokens standing in for them without T5); None keeps the pipeline's default.
    """
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {noise.shape[0]} noise tensors")
    factor = vae_scale_factor(pipe.vae)
    height, width = noise.shape[-2] * factor, noise.shape[-1] * factor
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        latents=noise.to(pipe.device, denoiser.dtype),
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type="latent",
        return_dict=True,
        **extra,
    )
    return out.images
