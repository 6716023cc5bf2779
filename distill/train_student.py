"""Stage two: distil the teacher's ODE into a one-step generator (Diffusion2GAN §3).

    accelerate launch distill/train_student.py --config configs/student/sd15_unet.yaml --pairs runs/pairs-sd15

Loss phases per step: G (E-LatentLPIPS regression to the teacher latent + non-saturating GAN), D
(real / fake / mix-and-match), lazy single-sample R1. Progress is counted in steps and images (nimg);
checkpoints are accelerate ``save_state`` directories and ``--resume_from_checkpoint latest`` (the
default) continues a killed run from its last checkpoint with the same random streams. Before anything
heavy loads, the teacher is checked against the pairs' teacher and a resumed run against its saved
config; the held-out split is recorded in ``pairs_split.json`` (run and pipeline) for evaluation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data_gen.hub import push_folder
from data_gen.pairs import load_pairs, read_manifest, stored_text_shapes, target_statistics
from distill.core.config import (
    ConfigError,
    command,
    config_dict,
    parse_config,
    require_between,
    require_non_negative,
    require_positive,
    with_default,
)
from distill.core.lock import locked
from distill.distillation import run_checks
from distill.distillation.card import card_facts
from distill.distillation.pair_data import PairRows, stored_conditioning
from distill.distillation.phases import REGRESSIONS, Batch
from distill.distillation.setup import (
    COND_DTYPE,
    FROZEN_DTYPES,
    LORA_BASE_DTYPES,
    build_optimizers,
    build_regression_lpips,
    build_step,
    build_student,
    check_shared_base,
    check_shared_base_family,
    export_pipeline,
    validate_and_sample,
    validation_set,
)
from distill.distillation.students import STUDENTS, apply_student_defaults, apply_teacher_defaults
from distill.training import checkpoint as ckpt
from distill.training.gan_step import build_ema
from distill.training.loop import TrainLoop, state_bytes
from distill.training.prefetch import Prefetch
from distill.training.run_config import GANRunConfig, check_gan_keys
from distill.training.run_record import save_run_config
from distill.training.seeds import step_generator
from distill.training.trackers import tracker_config

STUDENT_SIZES = tuple(STUDENTS["gigagan"].presets)  # the size presets of the style students (the same for both)


def _per_student(key: str) -> str:
    fmt = lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    return "default per student: " + ", ".join(f"{name} {fmt(spec.defaults[key])}" for name, spec in STUDENTS.items())


@dataclass
class StudentConfig(GANRunConfig):
    output_dir: str = with_default(GANRunConfig, "output_dir", "runs/student")
    num_workers: int = with_default(
        GANRunConfig,
        "num_workers",
        0,
        help="DataLoader workers reading the next pair micro-batches ahead (0: read in the training process; the "
        "batches are the same either way)",
    )
    tracker_project_name: str = with_default(GANRunConfig, "tracker_project_name", "train_student")
    learning_rate_g: Optional[float] = with_default(
        GANRunConfig, "learning_rate_g", None, help=f"Adam lr of the generator ({_per_student('learning_rate_g')})"
    )
    learning_rate_d: float = with_default(GANRunConfig, "learning_rate_d", 1e-5)
    r1_gamma: float = with_default(GANRunConfig, "r1_gamma", 1e-5)
    ema_half_life_kimg: float = with_default(
        GANRunConfig,
        "ema_half_life_kimg",
        500.0,
        help="EMA half-life in thousands of images (0 = off; EDM's 500, capped early on by ema_rampup)",
    )
    validation_steps: int = with_default(
        GANRunConfig,
        "validation_steps",
        500,
        help="held-out metrics, validation images (PNG grid + trackers) and curves.png every N steps",
    )
    validation_prompts: list[str] = with_default(
        GANRunConfig,
        "validation_prompts",
        default_factory=list,
        help="validation images: these prompts x num_validation_seeds fixed noise maps (the teacher's images solved "
        "once at the start); empty: the first 8 held-out pairs",
    )
    teacher: str = field(
        default="",
        metadata={
            "help": "teacher hub id / folder; empty = the one in the pairs manifest",
            "aliases": ["pretrained_model_name_or_path"],
        },
    )
    revision: Optional[str] = field(default=None, metadata={"help": "teacher revision"})
    variant: Optional[str] = field(default=None, metadata={"help": "teacher weights variant"})
    allow_teacher_mismatch: bool = field(
        default=False,
        metadata={
            "help": "train with another teacher than the one that made the pairs (deliberate cross-teacher work)"
        },
    )
    pairs: str = field(default="", metadata={"help": "pairs directory written by generate_pairs.py"})
    student: str = field(default="unet", metadata={"help": "generator", "choices": tuple(STUDENTS)})
    student_timestep: int = field(default=999, metadata={"help": "fixed timestep of the UNet student"})
    student_size: str = field(
        default="base", metadata={"help": "preset of the gigagan / stylegan_t generators", "choices": STUDENT_SIZES}
    )
    regression: str = field(default="elatentlpips", metadata={"help": "regression loss", "choices": REGRESSIONS})
    lpips_weight: float = field(default=1.0, metadata={"help": "weight of the regression term"})
    lpips_network: str = field(
        default="official",
        metadata={"help": "latent LPIPS weights: a local path, 'official', or 'random' (tests only)"},
    )
    lpips_augment: str = field(default="bg,cutout", metadata={"help": "E-LatentLPIPS augmentation policy ('' = none)"})
    lpips_l1_weight: float = field(default=0.0, metadata={"help": "extra L1 term inside the regression loss"})
    gan_weight: float = field(default=0.1, metadata={"help": "weight of the GAN term (0 = regression only)"})
    gan_noise: Optional[str] = field(
        default=None,
        metadata={
            "help": "noise the GAN fakes are made from: the pairs' own (the paper) or fresh samples "
            f"({_per_student('gan_noise')})",
            "choices": ("pairs", "fresh"),
        },
    )
    gan_start_step: Optional[int] = field(
        default=None,
        metadata={"help": f"regression alone before this step, then + GAN ({_per_student('gan_start_step')})"},
    )
    d_heads: Optional[str] = field(
        default=None,
        metadata={
            "help": "discriminator heads; unset: before,skip,after,final (UNet D), early,middle,late (SD3 "
            "transformer D)"
        },
    )
    frozen_dtype: str = field(
        default="fp32",
        metadata={
            "help": "dtype the frozen text encoder(s) and VAE are held in (bf16 / fp16 halve them; their outputs are "
            "cast back to fp32)",
            "choices": tuple(FROZEN_DTYPES),
        },
    )
    d_gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "trade compute for memory in the discriminator's UNet backbone (recomputed in the backward; R1's "
            "double backward included)"
        },
    )
    d_lora_rank: int = field(default=0, metadata={"help": "train the D backbone through LoRA of this rank (0 = full)"})
    student_lora_rank: int = field(
        default=0,
        metadata={
            "help": "the UNet student as the frozen teacher UNet + a LoRA adapter of this rank (alpha = rank; "
            "LCM-LoRA's targets: attention, feed-forward, resnet convs and time projections, resamplers), D "
            "as the same UNet with its own adapter (d_lora_rank > 0): the UNet held once; learning_rate_g "
            "unset: 1e-4 (0 = the full UNet student)"
        },
    )
    d_shared_base: Optional[bool] = field(
        default=None,
        metadata={
            "help": "D's backbone is the teacher UNet itself, frozen, trained through its d_lora_rank adapter (not a "
            "copy); unset: true with student_lora_rank, else false (a GAN student may set it)"
        },
    )
    lora_base_dtype: str = field(
        default="fp32",
        metadata={
            "help": "dtype of the shared frozen UNet (student_lora_rank / d_shared_base): bf16 halves it, but the "
            "LoRA student then runs in bf16 (its x0 amplifies the rounding 14.6x) and D under bf16 autocast",
            "choices": tuple(LORA_BASE_DTYPES),
        },
    )
    mix_fraction: float = field(
        default=0.25, metadata={"help": "fraction of real pairs shown with a wrong condition as fake"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory in the student"})
    holdout: int = field(default=16, metadata={"help": "pairs (the last indices) held out for validation"})
    num_validation_seeds: int = field(default=2, metadata={"help": "noise maps (seeds 0..N-1) per validation prompt"})
    push_to_hub: bool = field(
        default=False, metadata={"help": "upload the final pipeline folder (model card included) to the Hub"}
    )
    hub_model_id: str = field(
        default="", metadata={"help": "push_to_hub: the repo id (user/name); empty: the output_dir's name"}
    )
    hub_token: Optional[str] = field(
        default=None, metadata={"help": "push_to_hub: a token (default: the one `hf auth login` stored)"}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "push_to_hub: create the repo private"})


def check(cfg: StudentConfig) -> None:
    if not cfg.pairs:
        raise ConfigError("no pairs given: set `pairs` to a directory written by distill/generate_pairs.py")
    check_shared_base(cfg)  # (before the per-student defaults: a LoRA student's own learning_rate_g)
    apply_student_defaults(
        cfg
    )  # (student, student_size, regression, gan_noise, mixed_precision: choices checked by parse_config)
    check_gan_keys(cfg)
    require_positive(cfg, "num_validation_seeds")
    require_non_negative(
        cfg, "gan_start_step", "holdout", "gan_weight", "lpips_weight", "lpips_l1_weight", "d_lora_rank"
    )
    require_between(cfg, "mix_fraction", 0.0, 1.0)


def check_with_pairs(cfg: StudentConfig, manifest: dict) -> None:
    """Keys whose valid range depends on the pairs (their teacher, scheduler and size)."""
    apply_teacher_defaults(cfg, family=manifest["teacher"].get("family", "sd"))
    check_shared_base_family(cfg, family=manifest["teacher"].get("family", "sd"))
    steps = int(manifest.get("scheduler_config", {}).get("num_train_timesteps", 1000))
    if cfg.student == "unet" and not 0 <= cfg.student_timestep < steps:
        raise ConfigError(
            f"student_timestep must be in [0, {steps - 1}] (the teacher scheduler's num_train_timesteps is {steps}), "
            f"got {cfg.student_timestep}"
        )
    n_train = int(manifest["count"]) - cfg.holdout
    if n_train < cfg.batch_size:
        raise ConfigError(
            f"{manifest['count']} pairs leave {n_train} for training after holdout={cfg.holdout}: "
            f"need at least batch_size={cfg.batch_size}"
        )


@command
def main() -> None:
    cfg = parse_config(StudentConfig, description=__doc__)
    check(cfg)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    manifest = read_manifest(cfg.pairs)
    check_with_pairs(cfg, manifest)
    out = Path(cfg.output_dir)
    split = run_checks.split_record(pairs=cfg.pairs, manifest=manifest, holdout=cfg.holdout)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    # Unset, the launcher's choice (`accelerate launch --mixed_precision bf16`) applies; the run records what it used.
    cfg.mixed_precision = accelerator.mixed_precision
    if ckpt.resolve_resume(out, cfg.resume_from_checkpoint) is not None:  # (the precision too: resolved first)
        run_checks.check_resume(out, config=config_dict(cfg), split=split)
    same_teacher = run_checks.check_teacher(
        teacher=cfg.teacher or manifest["teacher"]["name_or_path"],
        revision=cfg.revision or manifest["teacher"].get("revision"),
        variant=cfg.variant,
        manifest=manifest,
        pairs=cfg.pairs,
        allow_mismatch=cfg.allow_teacher_mismatch,
    )
    stored_text = stored_text_shapes(manifest) is not None
    if stored_text and not same_teacher:
        sys.stderr.write(
            f"warning: the prompt embeddings stored in {cfg.pairs} are another teacher's: this teacher's text encoder "
            "encodes the prompts instead\n"
        )
    accelerator.print(f"mixed precision: {cfg.mixed_precision}")
    with locked(
        out,
        purpose="train_student",
        is_main_process=accelerator.is_main_process,
        broadcast=lambda x: broadcast_object_list([x])[0],
    ):
        train(cfg, accelerator=accelerator, manifest=manifest, split=split, stored_text=stored_text and same_teacher)
    # leave together: a rank that tears down gloo while its peer still exports can abort
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if (
        cfg.push_to_hub and accelerator.is_main_process
    ):  # after the process group is gone: an upload may outlast its timeout
        url = push_folder(
            out / "pipeline",
            repo_id=cfg.hub_model_id or out.resolve().name,
            token=cfg.hub_token,
            private=cfg.hub_private_repo,
            commit_message="One-step student (distill/train_student.py)",
        )
        print(f"pushed to the Hub: {url}")


def train(cfg: StudentConfig, *, accelerator, manifest: dict, split: dict, stored_text: bool) -> None:
    """The training loop, with ``output_dir`` locked; ``stored_text``: condition on the prompt embeddings stored with
    the pairs rather than encoding the prompts at every step."""
    from accelerate.utils import set_seed

    # 1. Load: the pairs (rows in index order: the first n_train train, the rest are held out).
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # same initial weights (heads, zero convs) on every rank
    rank, world = accelerator.process_index, accelerator.num_processes
    pairs = load_pairs(cfg.pairs).with_format("torch")
    if not stored_text:  # not read at all then
        pairs = pairs.remove_columns(list(stored_text_shapes(manifest) or {}))
    n_train = split["train_indices"][1]
    holdout = pairs[n_train:]

    # 2. Build: teacher, student, D, text encoder, losses, EMA, optimisers. A GAN student from scratch
    # outputs at the training targets' measured scale (the defaults then hold on any teacher's latents).
    style_student = STUDENTS[cfg.student].generator is not None
    stats = target_statistics(pairs, rows=n_train) if style_student and cfg.output_latent_stats else None
    parts = build_student(cfg, manifest=manifest, device=accelerator.device, latent_stats=stats)
    teacher, student, disc = parts.teacher, parts.student, parts.discriminator
    lpips_loss = (
        build_regression_lpips(cfg, teacher=teacher, accelerator=accelerator)
        if cfg.regression == "elatentlpips"
        else None
    )
    validation = validation_set(cfg, parts, holdout=holdout, manifest=manifest) if accelerator.is_main_process else None
    parts.release_teacher_unet()
    parts.hold_frozen_in(FROZEN_DTYPES[cfg.frozen_dtype])
    ema = build_ema(
        student,
        half_life_kimg=cfg.ema_half_life_kimg,
        rampup=cfg.ema_rampup,
        device=cfg.ema_device,
        dtype=cfg.ema_dtype,
    )
    opt_g, opt_d = build_optimizers(cfg, student=student, discriminator=disc)

    # 3. Prepare: DDP wrapping, the loop (checkpoints, EMA, logging), resume.
    if disc is not None:
        student, disc, opt_g, opt_d = accelerator.prepare(student, disc, opt_g, opt_d)
    else:
        student, opt_g = accelerator.prepare(student, opt_g)
    unwrap_d = accelerator.unwrap_model(disc) if disc is not None else None
    pipe = teacher.pipe
    # The EMA student is saved twice: in the accelerate state and as the checkpoint's pipeline (a LoRA student's: merged
    # into a copy of the shared base).
    size_models = [
        student,
        disc,
        ema.model,
        ema.model,
        pipe.vae,
        pipe.text_encoder,
        getattr(pipe, "text_encoder_2", None),
        getattr(pipe, "text_encoder_3", None),
        parts.shared.unet if cfg.student_lora_rank > 0 else None,
    ]

    def validate(step: int) -> None:
        if not accelerator.is_main_process:  # validation runs on the main process only
            return
        with ema.on(accelerator.device) as model:  # a CPU EMA is evaluated on the training device
            validate_and_sample(
                cfg,
                parts,
                model,
                holdout,
                lpips_loss,
                accelerator,
                step=step,
                stats_path=out / "stats.jsonl",
                validation=validation,
            )

    def export(path: Path) -> None:
        with ema.on(accelerator.device) as model:
            export_pipeline(
                parts,
                model,
                path,
                split=split,
                validation=validation,
                card=card_facts(cfg, manifest=manifest, nimg=loop.state.nimg, step=loop.state.step),
            )

    loop = TrainLoop(
        accelerator,
        output_dir=out,
        seed=cfg.seed,
        max_train_steps=cfg.max_train_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        batch_size=cfg.batch_size,
        checkpointing_steps=cfg.checkpointing_steps,
        validation_steps=cfg.validation_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit,
        ema=ema,
        model=student,
        export=export,
        validate=validate,
        checkpoint_bytes=lambda: state_bytes(models=size_models, optimizers=[opt_g, opt_d]),
    )
    loop.resume(cfg.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_run_config(cfg, out, step=loop.state.global_step)
        run_checks.write_split(out / run_checks.SPLIT_FILE, split)
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    if loop.state.step == 0:
        validate(0)
    data = Prefetch(
        PairRows(pairs, num_train=n_train, seed=cfg.seed, rank=rank, world=world, batch_size=cfg.batch_size),
        num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    data.start(loop.micro_steps().start)

    def read_batch(micro: int, gan_on: bool) -> Batch:
        rows = data.read(micro)
        noise = rows["noise"].to(accelerator.device, torch.float32, non_blocking=True)
        fresh = None
        if gan_on and cfg.gan_noise == "fresh":  # fakes for D from new noise (a from-scratch G memorises the pairs)
            z_gen = step_generator(seed=cfg.seed, rank=rank, step=micro, purpose="z")
            fresh = torch.randn(noise.shape, generator=z_gen).to(accelerator.device)
        target = rows["target"].to(accelerator.device, torch.float32, non_blocking=True)
        cond = (
            stored_conditioning(
                rows, resolution=parts.resolution, device=accelerator.device, dtype=COND_DTYPE, family=teacher.family
            )
            if stored_text
            else parts.encode(rows["prompt"])
        )
        return Batch(noise, target, cond, gan_noise=fresh)

    # 4. Loop: the shared GAN step (distill/training/gan_step.py: G phase, then D with lazy R1 on one real pair) on
    # this step's pairs; EMA, logs, checkpoints, validation.
    engine = build_step(
        cfg,
        loop,
        student=student,
        discriminator=disc,
        discriminator_unwrapped=unwrap_d,
        lpips_loss=lpips_loss,
        opt_g=opt_g,
        opt_d=opt_d,
    )
    with loop.progress():
        while not loop.done:
            gan_on = disc is not None and cfg.gan_weight > 0 and loop.state.step >= cfg.gan_start_step
            engine.run([read_batch(micro, gan_on) for micro in loop.micro_steps()], adversarial=gan_on)

    # 5. Save: the EMA student as a pipeline.
    if accelerator.is_main_process:
        loop.export_final(out / "pipeline")
        accelerator.print(
            f"done: {loop.state.step} steps, {loop.state.nimg} images; one-step pipeline in "
            f"{(out / 'pipeline').resolve()}"
        )


if __name__ == "__main__":
    main()
