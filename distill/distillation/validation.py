"""Validation pictures: fixed prompts x fixed noise, the teacher's images once, the student's every N steps.

The set is fixed when a run starts: ``validation_prompts`` x ``num_validation_seeds`` noise maps (seed s
is the noise of a pairs row with ``seed == s``), whose teacher latents are solved once with the pairs'
sampler; or, without prompts, the first held-out pairs, whose teacher latents the pairs already hold.
Grids have one row per prompt (one column per seed), or one row of held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from PIL import Image

from data_gen.noise import noise_for_seed
from students.latents import decode_vae, vae_scale_factor
from teachers.ode import solve_ode

HOLDOUT_IMAGES = 8


@dataclass
class ValidationSet:
    prompts: list[str]  # one per image, row-major
    noise: torch.Tensor  # [N,C,h,w] unit Gaussian
    teacher: torch.Tensor  # [N,C,h,w] the teacher's latents for the same noise and prompts
    cols: int  # images per grid row
    teacher_images: list = field(default_factory=list)  # decoded once, on first use


def from_holdout(holdout: dict, *, count: int = HOLDOUT_IMAGES) -> ValidationSet:
    """The first ``count`` held-out pairs (prompt, noise, teacher latent), one grid row."""
    n = min(count, len(holdout["prompt"]))
    return ValidationSet(
        prompts=list(holdout["prompt"][:n]),
        noise=holdout["noise"][:n].float(),
        teacher=holdout["target"][:n].float(),
        cols=max(n, 1),
    )


@torch.no_grad()
def from_prompts(
    prompts: list[str],
    *,
    num_seeds: int,
    teacher_pipe,
    latent_shape: tuple[int, int, int],
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str | None,
    max_sequence_length: int | None = None,
) -> ValidationSet:
    """``prompts`` x seeds ``0..num_seeds-1``; the teacher's latents solved here, once (its ODE, as the pairs were)."""
    rows = [(p, s) for p in prompts for s in range(num_seeds)]
    noise = torch.stack([noise_for_seed(s, latent_shape) for _, s in rows])  # [N,C,h,w]
    teacher_pipe.set_progress_bar_config(disable=True)  # one short solve; the training bar stays readable
    teacher = (
        solve_ode(
            teacher_pipe,
            prompts=[p for p, _ in rows],
            noise=noise,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        .float()
        .cpu()
    )
    return ValidationSet(prompts=[p for p, _ in rows], noise=noise, teacher=teacher, cols=num_seeds)


@torch.no_grad()
def student_latents(student, encode, vs: ValidationSet, *, device, chunk: int = 64) -> torch.Tensor:
    """The student's latents [N,C,h,w] for the set; ``encode(prompts)`` gives the text conditioning."""
    was_training = student.training
    student.eval()
    out = []
    for b in range(0, len(vs.prompts), chunk):
        cond = encode(vs.prompts[b : b + chunk])
        out.append(
            student(
                vs.noise[b : b + chunk].to(device), cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs()
            ).float()
        )
    student.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-scaled latents -> PIL images (the pipeline's decode, fp32 for a force_upcast VAE)."""
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae))
    images = decode_vae(vae, latents.to(vae.device))
    return processor.postprocess(images.float(), output_type="pil")


def grid(images: list[Image.Image], *, cols: int) -> Image.Image:
    return make_image_grid(images, rows=len(images) // cols, cols=cols)


def teacher_over_student(teacher: Image.Image, student: Image.Image, *, gap: int = 4) -> Image.Image:
    """The teacher's grid above the student's, a white gap between (the run's sample grids)."""
    out = Image.new("RGB", (max(teacher.width, student.width), teacher.height + gap + student.height), "white")
    out.paste(teacher, (0, 0))
    out.paste(student, (0, teacher.height + gap))
    return out


def teacher_grid(vae, vs: ValidationSet) -> Image.Image:
    if not vs.teacher_images:
        vs.teacher_images = decode(vae, vs.teacher)
    return grid(vs.teacher_images, cols=vs.cols)
