"""The UNet student as a stock diffusers pipeline: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
(and so ``AutoPipelineForText2Image``) run it in one step, with no code of this project.

The student evaluates the teacher's UNet once at t = T - 1 on the noise and reads its output as x0
(``students/unet_student.py``). A DDIM scheduler with ``timestep_spacing="trailing"`` and one inference
step visits exactly t = T - 1; with ``set_alpha_to_one=True`` the step's target ᾱ is 1, so DDIM's update
``sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) ε`` is the same x0 conversion, for ε- and v-prediction alike. With
``guidance_scale=0`` (or 1) there is no classifier-free guidance, as in training:

    pipe = AutoPipelineForText2Image.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0).images[0]
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from .unet_student import UNetStudent

# Scheduler settings that turn one DDIM step at t = T - 1 into the student's x0 (trailing spacing ignores
# steps_offset; 1 keeps the SD pipelines from warning about it).
ONE_STEP_DDIM = dict(
    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False, steps_offset=1
)


def one_step_scheduler(student: UNetStudent, *, scheduler_config: dict) -> DDIMScheduler:
    """The teacher's noise schedule (``scheduler_config``, any diffusers scheduler's config) as the one-step DDIM
    scheduler of ``student``; refuses a student the stock step cannot reproduce."""
    cfg = student.config
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"a stock pipeline needs an epsilon or v_prediction student, not {cfg.prediction_type!r}")
    scheduler = DDIMScheduler.from_config(scheduler_config, **ONE_STEP_DDIM, prediction_type=cfg.prediction_type)
    scheduler.set_timesteps(1)
    if int(scheduler.timesteps[0]) != cfg.timestep:
        raise ValueError(
            f"the student runs at t = {cfg.timestep}, but one trailing DDIM step visits t = "
            f"{int(scheduler.timesteps[0])}: "
            "a stock pipeline can only run students trained at the schedule's last timestep"
        )
    alpha = float(scheduler.alphas_cumprod[cfg.timestep])
    if abs(alpha - cfg.alpha_cumprod) > 1e-6 * max(1.0, cfg.alpha_cumprod) + 1e-9:
        raise ValueError(
            f"scheduler_config gives alpha_bar({cfg.timestep}) = {alpha:.6g}, the student was trained with "
            f"{cfg.alpha_cumprod:.6g}: pass the scheduler of the teacher that made its pairs"
        )
    return scheduler


def save_stock_pipeline(pipe, save_directory: str | os.PathLike, *, scheduler_config: dict, **save_kwargs) -> Path:
    """Write ``pipe`` (a ``OneStepGANPipeline`` with a ``UNetStudent``) as a ``StableDiffusionPipeline`` folder (an
    ``…XLPipeline`` one for SDXL students: two text encoders), the student's UNet weights as its ``unet``."""
    student = pipe.student
    if not isinstance(student, UNetStudent):
        raise ValueError(
            f"only the UNet student is an SD UNet; a {type(student).__name__} needs its own pipeline "
            "(students/export.py: save_standalone)"
        )
    scheduler = one_step_scheduler(student, scheduler_config=scheduler_config)
    parts = dict(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=student.unet, scheduler=scheduler
    )
    if getattr(pipe, "text_encoder_2", None) is not None:
        stock = StableDiffusionXLPipeline(**parts, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    else:
        stock = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    stock.save_pretrained(str(save_directory), **save_kwargs)
    return Path(save_directory)
