"""(prompts, noise) -> latents -> images for a one-step student folder or a diffusion teacher (ODE solver)."""

from __future__ import annotations

from pathlib import Path

import torch


class Sampler:
    """(prompts, noise) -> latents -> images, for a one-step student or a teacher run with its ODE solver.

    ``pipeline`` is a OneStepGANPipeline folder (detected by its model_index.json) or anything
    :func:`teachers.load_teacher` takes; the solver settings only apply to a teacher.
    """

    def __init__(
        self,
        pipeline: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        scheduler: str,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str,
        max_sequence_length: int | None = None,
    ):
        from students.export import is_one_step_folder

        path = Path(pipeline)
        self.is_student = is_one_step_folder(path)
        if self.is_student:
            from students import OneStepGANPipeline

            self.pipe = OneStepGANPipeline.from_pretrained(str(path), dtype=dtype).to(device)
            self.latent_channels = self.pipe.student.latent_channels
            self.default_resolution = self.pipe.default_resolution()
            self.vae_scale_factor = self.pipe.vae_scale_factor
        else:
            from teachers import load_teacher

            teacher = load_teacher(pipeline, torch_dtype=dtype, scheduler=scheduler, device=device)
            self.pipe = teacher.pipe
            self.latent_channels = teacher.latent_channels
            self.vae_scale_factor = teacher.vae_scale_factor
            self.default_resolution = teacher.sample_size * self.vae_scale_factor
        self.pipe.set_progress_bar_config(disable=True)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        res = resolution or self.default_resolution
        if res % self.vae_scale_factor:
            raise ValueError(f"resolution {res} is not divisible by the VAE factor {self.vae_scale_factor}")
        return (self.latent_channels, res // self.vae_scale_factor, res // self.vae_scale_factor)

    @torch.no_grad()
    def latents(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """``noise`` [N,C,h,w] unit Gaussian -> VAE-scaled latents [N,C,h,w] (float32, CPU)."""
        if self.is_student:
            out = self.pipe(prompts, latents=noise, output_type="latent").images
        else:
            from teachers import solve_ode

            out = solve_ode(
                self.pipe,
                prompts=prompts,
                noise=noise,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                negative_prompt=self.negative_prompt or None,
                max_sequence_length=self.max_sequence_length,
            )
        return out.float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1] (float32, CPU); an fp16 VAE with
        ``force_upcast`` (SDXL's) decodes in fp32, as diffusers' SDXL pipeline does."""
        from students.latents import decode_vae

        vae = self.pipe.vae
        return decode_vae(vae, latents.to(vae.device) if vae is not None else latents).float().cpu()

    def images(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        return self.decode(self.latents(prompts, noise))
