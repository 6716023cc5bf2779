"""Keys the training commands share, declared once (help, aliases, choices, checks) and composed by each
command's schema as a base dataclass: :class:`RunConfig` for every trainer (run folder, length, checkpoints,
trackers), :class:`GANRunConfig` adds the GAN optimiser / EMA / R1 keys of ``train_student.py`` and
``train_gan.py``. A command redeclares a key only to change its default (:func:`distill.core.config.with_default`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import require_between, require_non_negative, require_positive, require_positive_or_null
from distill.training.ema import EMA_DEVICES, EMA_DTYPES
from distill.training.optimizers import OPTIMIZERS, require_optimizer

MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class RunConfig:
    output_dir: str = field(
        default="runs/run", metadata={"help": "run directory (resolved config, checkpoints, logs, outputs)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the data order and every random stream"})
    mixed_precision: Optional[str] = field(
        default=None,
        metadata={
            "help": "autocast dtype; unset: the accelerate launcher's choice (accelerate launch --mixed_precision / "
            "accelerate config), else no",
            "choices": MIXED_PRECISIONS,
        },
    )
    max_train_steps: int = field(default=10000, metadata={"help": "optimiser steps"})
    batch_size: int = field(
        default=8, metadata={"help": "per-process batch per micro-step", "aliases": ["train_batch_size"]}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers", "aliases": ["dataloader_num_workers"]})
    checkpointing_steps: int = field(default=500, metadata={"help": "save_state every N steps"})
    checkpoints_total_limit: Optional[int] = field(
        default=3, metadata={"help": "keep at most N checkpoints (null: all)"}
    )
    resume_from_checkpoint: str = field(
        default="latest",
        metadata={"help": "latest, none, a checkpoint name in output_dir (checkpoint-500) or a checkpoint dir"},
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker(s): tensorboard, wandb, all, or 'none'"}
    )
    tracker_project_name: str = field(default="train", metadata={"help": "project / run name given to the trackers"})


def check_run_keys(cfg: RunConfig) -> None:
    """One-line errors for the shared keys (``checkpointing_steps`` is checked by each command: 0 means
    "only at the end" for some)."""
    require_positive(cfg, "max_train_steps", "batch_size")
    require_non_negative(cfg, "num_workers")
    require_positive_or_null(cfg, "checkpoints_total_limit")


@dataclass
class GANRunConfig(RunConfig):
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per step"})
    learning_rate_g: Optional[float] = field(default=2e-3, metadata={"help": "Adam lr of the generator"})
    learning_rate_d: float = field(default=2e-3, metadata={"help": "Adam lr of the discriminator"})
    adam_beta1: float = field(default=0.0, metadata={"help": "Adam beta1 (GAN practice: 0)"})
    adam_beta2: float = field(default=0.99, metadata={"help": "Adam beta2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    mapping_lr_mul: Optional[float] = field(
        default=None,
        metadata={
            "help": "gigagan / stylegan_t: learning-rate multiplier of the mapping network (unset: StyleGAN's 0.01)"
        },
    )
    ema_half_life_kimg: float = field(
        default=10.0, metadata={"help": "EMA half-life in thousands of images (0 = off; capped early on by ema_rampup)"}
    )
    ema_rampup: float = field(
        default=0.05, metadata={"help": "EMA half-life at most this x images seen (StyleGAN2-ADA ramp-up; 0 = off)"}
    )
    loss: str = field(
        default="non_saturating",
        metadata={
            "help": "GAN objective: non_saturating (Diffusion2GAN, GigaGAN) or hinge (StyleGAN-T)",
            "choices": ("non_saturating", "hinge"),
        },
    )
    r1_gamma: float = field(default=0.0, metadata={"help": "R1 weight (0 = off)"})
    r1_interval: int = field(default=16, metadata={"help": "lazy R1 every N steps"})
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "linear learning-rate warm-up of both networks over N steps (0 = off)"}
    )
    optimizer: str = field(
        default="adam",
        metadata={
            "help": "optimiser of G and D: adam, or adam8bit (bitsandbytes' 8-bit states: 2 instead of 8 bytes per "
            "parameter; needs pip install bitsandbytes)",
            "choices": OPTIMIZERS,
        },
    )
    linear_lr_by_fan_in: bool = field(
        default=True,
        metadata={
            "help": "gigagan / stylegan_t: plain linear layers at learning_rate_g / sqrt(fan-in), as if equalised "
            "(false: learning_rate_g for every parameter)"
        },
    )
    output_latent_stats: bool = field(
        default=True,
        metadata={
            "help": "gigagan / stylegan_t: set the output to the training samples' measured per-channel mean / std "
            "(false: unit scale)"
        },
    )
    ema_device: str = field(
        default="same",
        metadata={
            "help": "where the EMA copy of the generator lives: 'same' (the training device) or 'cpu' (saves its "
            "size in accelerator memory, costs a copy to the host per step)",
            "choices": EMA_DEVICES,
        },
    )
    ema_dtype: str = field(
        default="fp32",
        metadata={
            "help": "dtype of the EMA copy: bf16 halves it, but rounds away updates below ~1/256 of a weight (a long "
            "half-life then barely moves it; prefer ema_device cpu)",
            "choices": tuple(EMA_DTYPES),
        },
    )
    d_timestep: int = field(
        default=0, metadata={"help": "fixed timestep embedding given to a diffusion-model discriminator's backbone"}
    )
    validation_steps: int = field(default=500, metadata={"help": "validation every N steps"})
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "prompts of the validation images (a list, as in diffusers' examples: --validation_prompts \"a "
            'cat" "a dog")'
        },
    )


def check_gan_keys(cfg: GANRunConfig) -> None:
    """The shared keys' checks plus the GAN optimiser / EMA / R1 ones (``learning_rate_g`` resolved first)."""
    check_run_keys(cfg)
    require_positive(
        cfg,
        "gradient_accumulation_steps",
        "r1_interval",
        "checkpointing_steps",
        "validation_steps",
        "learning_rate_g",
        "learning_rate_d",
        "mapping_lr_mul",
    )
    require_non_negative(
        cfg, "max_grad_norm", "ema_half_life_kimg", "ema_rampup", "r1_gamma", "d_timestep", "lr_warmup_steps"
    )
    require_optimizer(cfg.optimizer)  # before anything loads: a missing bitsandbytes is one line
    for key in ("adam_beta1", "adam_beta2"):
        require_between(cfg, key, 0.0, 1.0, high_inclusive=False)
