"""Stage two's students (``STUDENTS``): how each is built from the teacher, the training settings that suit it, the
teacher families it fits; read by ``distill/train_student.py`` (through :mod:`distill.distillation.setup`) and the
memory planner. The GAN generators' classes and size presets are the generators' own registry,
:mod:`students.registry` (``distill/train_gan.py`` reads it there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from students import SD3TransformerStudent, UNetStudent
from students.registry import GENERATORS
from teachers import Teacher


def _unet_student(cfg, teacher: Teacher, latent_stats=None) -> torch.nn.Module:
    """The teacher's UNet at a fixed timestep, initialised from its weights (Diffusion2GAN §3)."""
    return UNetStudent.from_teacher(teacher.pipe.unet, teacher.pipe.scheduler, timestep=cfg.student_timestep)


def _transformer_student(cfg, teacher: Teacher, latent_stats=None) -> torch.nn.Module:
    """The teacher's MMDiT at sigma = 1 in the x0 parameterisation, initialised from its weights (§3, for SD3)."""
    return SD3TransformerStudent.from_teacher(teacher.pipe.transformer, teacher.pipe.scheduler)


def _style_student(cls) -> Callable:
    def build(cfg, teacher: Teacher, latent_stats: tuple[list[float], list[float]] | None = None) -> torch.nn.Module:
        """A GAN generator of preset ``student_size`` from scratch, sized for the teacher's latents and text;
        ``latent_stats``: the target latents' per-channel (mean, std), the scale its output is set to."""
        unet = teacher.pipe.unet
        text_2 = getattr(teacher.pipe, "text_encoder_2", None)
        overrides = {} if cfg.mapping_lr_mul is None else {"mapping_lr_mul": cfg.mapping_lr_mul}
        if latent_stats is not None:
            overrides.update(latent_mean=tuple(latent_stats[0]), latent_std=tuple(latent_stats[1]))
        return cls.for_latents(
            latent_channels=teacher.latent_channels,
            sample_size=int(unet.config.sample_size),
            cross_attention_dim=int(unet.config.cross_attention_dim),
            pooled_dim=int(text_2.config.projection_dim) if text_2 is not None else 0,  # SDXL's pooled prompt
            size=cfg.student_size,
            **overrides,
        ).to(unet.dtype)

    return build


@dataclass(frozen=True)
class StudentSpec:
    """A generator: how stage two builds it from the teacher, the training settings that suit it (the values
    of config keys a user leaves unset), and for the style-based GANs their class and size presets, from
    which ``train_gan.py`` builds them without a teacher."""

    build: Callable  # (cfg, teacher, latent_stats=None) -> student
    defaults: dict = field(default_factory=dict)
    generator: type | None = None  # None: needs a teacher (the UNet student)
    presets: dict = field(default_factory=dict)
    families: tuple[str, ...] = ("sd", "sdxl")  # teacher families whose text conditioning and denoiser it is built for


# Defaults measured on the digits testbed (docs/gan-students.md): the UNet starts from the teacher
# and needs only a small step size; the GAN generators start from scratch, so they take StyleGAN-scale
# learning rates on their equalised layers and learn the ODE map by regression before the GAN joins.
STUDENTS = {
    "unet": StudentSpec(_unet_student, dict(learning_rate_g=1e-5, gan_start_step=0, gan_noise="pairs")),
    **{
        name: StudentSpec(
            _style_student(cls),
            dict(learning_rate_g=3e-3, gan_start_step=1000, gan_noise="fresh"),
            generator=cls,
            presets=presets,
        )
        for name, (cls, presets) in GENERATORS.items()
    },
    # Like the UNet student: the teacher's own denoiser, read as x0 (its defaults; not yet measured on an SD3 digits
    # teacher).
    "transformer": StudentSpec(
        _transformer_student, dict(learning_rate_g=1e-5, gan_start_step=0, gan_noise="pairs"), families=("sd3",)
    ),
}

# The discriminator's heads when d_heads is unset, by the teacher's denoiser.
DEFAULT_D_HEADS = {"sd": "before,skip,after,final", "sdxl": "before,skip,after,final", "sd3": "early,middle,late"}


def apply_student_defaults(cfg) -> None:
    """Fill the config keys left unset (None) with the chosen student's defaults, in place."""
    for key, value in STUDENTS[cfg.student].defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)


def apply_teacher_defaults(cfg, *, family: str) -> None:
    """Check the student fits the pairs' teacher ``family`` and fill ``d_heads`` when unset, in place."""
    spec = STUDENTS[cfg.student]
    if family not in spec.families:
        fits = [name for name, s in STUDENTS.items() if family in s.families]
        raise ValueError(
            f"student {cfg.student!r} is built for {'/'.join(spec.families)} teachers, but the pairs' teacher is "
            f"{family}: use --student {' or '.join(fits)}"
        )
    if cfg.d_heads is None:
        cfg.d_heads = DEFAULT_D_HEADS[family]
