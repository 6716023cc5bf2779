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

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `accelerate launch distill/train_student.py` runs this as a plain file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from data_gen.pairs import load_pairs, read_manifest
from distill.config import (ConfigError, config_dict, parse_config, require_between, require_non_negative, require_positive,
                            run_cli, save_config)
from distill.lock import locked
from distill.training import checkpoint as ckpt
from distill.training import run_checks
from distill.training.ema import EMA
from distill.training.phases import PER_STEP_TERMS, REGRESSIONS, Batch, discriminator_terms, generator_terms, micro_batch_loss
from distill.training.seeds import batch_indices, step_generator
from distill.training.card import card_facts
from distill.training.setup import (STUDENTS, apply_student_defaults, apply_teacher_defaults, build_lpips, build_student,
                                    export_pipeline, validate_and_sample, validation_set)
from distill.training.trackers import tracker_config

STUDENT_SIZES = ("tiny", "small", "base")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


def _per_student(key: str) -> str:
    fmt = lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    return "default per student: " + ", ".join(f"{name} {fmt(spec.defaults[key])}" for name, spec in STUDENTS.items())


@dataclass
class StudentConfig:
    teacher: str = field(default="", metadata={"help": "teacher hub id / folder; empty = the one in the pairs manifest",
                                                "aliases": ["pretrained_model_name_or_path"]})
    revision: Optional[str] = field(default=None, metadata={"help": "teacher revision"})
    variant: Optional[str] = field(default=None, metadata={"help": "teacher weights variant"})
    allow_teacher_mismatch: bool = field(default=False, metadata={"help": "train with another teacher than the one that made the pairs (deliberate cross-teacher work)"})
    pairs: str = field(default="", metadata={"help": "pairs directory written by generate_pairs.py"})
    student: str = field(default="unet", metadata={"help": "generator", "choices": tuple(STUDENTS)})
    student_timestep: int = field(default=999, metadata={"help": "fixed timestep of the UNet student"})
    student_size: str = field(default="base", metadata={"help": "preset of the gigagan / stylegan_t generators", "choices": STUDENT_SIZES})
    mapping_lr_mul: Optional[float] = field(default=None, metadata={"help": "gigagan / stylegan_t: learning-rate multiplier of the mapping network (unset: StyleGAN's 0.01)"})
    output_dir: str = field(default="runs/student", metadata={"help": "run directory"})
    max_train_steps: int = field(default=10000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=8, metadata={"help": "per-process batch per micro-step", "aliases": ["train_batch_size"]})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per step"})
    learning_rate_g: Optional[float] = field(default=None, metadata={"help": f"Adam lr of the generator ({_per_student('learning_rate_g')})"})
    learning_rate_d: float = field(default=1e-5, metadata={"help": "Adam lr of the discriminator"})
    adam_beta1: float = field(default=0.0, metadata={"help": "Adam beta1 (GAN practice: 0)"})
    adam_beta2: float = field(default=0.99, metadata={"help": "Adam beta2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    regression: str = field(default="elatentlpips", metadata={"help": "regression loss", "choices": REGRESSIONS})
    lpips_weight: float = field(default=1.0, metadata={"help": "weight of the regression term"})
    lpips_network: str = field(default="official", metadata={"help": "latent LPIPS weights: a local path, 'official', or 'random' (tests only)"})
    lpips_augment: str = field(default="bg,cutout", metadata={"help": "E-LatentLPIPS augmentation policy ('' = none)"})
    lpips_l1_weight: float = field(default=0.0, metadata={"help": "extra L1 term inside the regression loss"})
    gan_weight: float = field(default=0.1, metadata={"help": "weight of the GAN term (0 = regression only)"})
    gan_noise: Optional[str] = field(default=None, metadata={"help": f"noise the GAN fakes are made from: the pairs' own (the paper) or fresh samples ({_per_student('gan_noise')})", "choices": ("pairs", "fresh")})
    gan_start_step: Optional[int] = field(default=None, metadata={"help": f"regression alone before this step, then + GAN ({_per_student('gan_start_step')})"})
    d_timestep: int = field(default=0, metadata={"help": "fixed timestep embedding given to the discriminator's backbone"})
    d_heads: Optional[str] = field(default=None, metadata={"help": "discriminator heads; unset: before,skip,after,final (UNet D), early,middle,late (SD3 transformer D)"})
    d_lora_rank: int = field(default=0, metadata={"help": "train the D backbone through LoRA of this rank (0 = full)"})
    mix_fraction: float = field(default=0.25, metadata={"help": "fraction of real pairs shown with a wrong condition as fake"})
    r1_gamma: float = field(default=1e-5, metadata={"help": "R1 weight (0 = off)"})
    r1_interval: int = field(default=16, metadata={"help": "lazy R1 every N steps"})
    ema_half_life_kimg: float = field(default=500.0, metadata={"help": "EMA half-life in thousands of images (0 = off; EDM's 500, capped early on by ema_rampup)"})
    ema_rampup: float = field(default=0.05, metadata={"help": "EMA half-life at most this x images seen (StyleGAN2-ADA ramp-up; 0 = off)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory in the student"})
    mixed_precision: Optional[str] = field(default=None, metadata={"help": "autocast dtype; unset: the accelerate launcher's choice (accelerate launch --mixed_precision / accelerate config), else no", "choices": MIXED_PRECISIONS})
    seed: int = field(default=0, metadata={"help": "seed of the data order and every random stream"})
    holdout: int = field(default=16, metadata={"help": "pairs (the last indices) held out for validation"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save_state every N steps"})
    checkpoints_total_limit: Optional[int] = field(default=3, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str = field(default="latest", metadata={"help": "latest, none, a checkpoint name in output_dir (checkpoint-500) or a checkpoint dir"})
    validation_steps: int = field(default=500, metadata={"help": "held-out metrics, validation images (PNG grid + trackers) and curves.png every N steps"})
    validation_prompts: list[str] = field(default_factory=list, metadata={"help": "validation images: these prompts x num_validation_seeds fixed noise maps (the teacher's images solved once at the start); empty: the first 8 held-out pairs"})
    num_validation_seeds: int = field(default=2, metadata={"help": "noise maps (seeds 0..N-1) per validation prompt"})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker(s): tensorboard, wandb, all, or 'none'"})
    tracker_project_name: str = field(default="train_student", metadata={"help": "project / run name given to the trackers"})


class TrainState:
    """Counters saved with every checkpoint (registered with accelerate)."""

    def __init__(self):
        self.step, self.nimg = 0, 0

    def state_dict(self):
        return {"step": self.step, "nimg": self.nimg}

    def load_state_dict(self, state):
        self.step, self.nimg = int(state["step"]), int(state["nimg"])


def check(cfg: StudentConfig) -> None:
    if not cfg.pairs:
        raise ConfigError("no pairs given: set `pairs` to a directory written by distill/generate_pairs.py")
    apply_student_defaults(cfg)  # (student, student_size, regression, gan_noise, mixed_precision: choices checked by parse_config)
    require_positive(cfg, "max_train_steps", "batch_size", "gradient_accumulation_steps", "r1_interval",
                     "checkpointing_steps", "validation_steps", "learning_rate_g", "learning_rate_d", "num_validation_seeds")
    require_non_negative(cfg, "gan_start_step", "holdout", "gan_weight", "lpips_weight", "lpips_l1_weight", "r1_gamma", "max_grad_norm",
                         "ema_half_life_kimg", "ema_rampup", "d_lora_rank", "d_timestep")
    require_between(cfg, "mix_fraction", 0.0, 1.0)
    for key in ("adam_beta1", "adam_beta2"):
        require_between(cfg, key, 0.0, 1.0, high_inclusive=False)
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit must be at least 1 (or null: keep all), got {cfg.checkpoints_total_limit}")


def check_with_pairs(cfg: StudentConfig, manifest: dict) -> None:
    """Keys whose valid range depends on the pairs (their teacher, scheduler and size)."""
    apply_teacher_defaults(cfg, family=manifest["teacher"].get("family", "sd"))
    steps = int(manifest.get("scheduler_config", {}).get("num_train_timesteps", 1000))
    if cfg.student == "unet" and not 0 <= cfg.student_timestep < steps:
        raise ConfigError(f"student_timestep must be in [0, {steps - 1}] (the teacher scheduler's num_train_timesteps is {steps}), "
                          f"got {cfg.student_timestep}")
    n_train = int(manifest["count"]) - cfg.holdout
    if n_train < cfg.batch_size:
        raise ConfigError(f"{manifest['count']} pairs leave {n_train} for training after holdout={cfg.holdout}: "
                          f"need at least batch_size={cfg.batch_size}")


def main() -> None:
    cfg = parse_config(StudentConfig, description=__doc__)
    check(cfg)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    manifest = read_manifest(cfg.pairs)
    check_with_pairs(cfg, manifest)
    out = Path(cfg.output_dir)
    split = run_checks.split_record(pairs=cfg.pairs, manifest=manifest, holdout=cfg.holdout)
    if ckpt.resolve_resume(out, cfg.resume_from_checkpoint) is not None:
        run_checks.check_resume(out, config=config_dict(cfg), split=split)
    run_checks.check_teacher(teacher=cfg.teacher or manifest["teacher"]["name_or_path"], revision=cfg.revision or manifest["teacher"].get("revision"),
                             variant=cfg.variant, manifest=manifest, pairs=cfg.pairs, allow_mismatch=cfg.allow_teacher_mismatch)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=str(out)
    )
    # Unset, the launcher's choice (`accelerate launch --mixed_precision bf16`) applies; the run records what it used.
    cfg.mixed_precision = accelerator.mixed_precision
    accelerator.print(f"mixed precision: {cfg.mixed_precision}")
    with locked(out, purpose="train_student", is_main_process=accelerator.is_main_process,
                broadcast=lambda x: broadcast_object_list([x])[0]):
        train(cfg, accelerator=accelerator, manifest=manifest, split=split)
    accelerator.end_training()


def train(cfg: StudentConfig, *, accelerator, manifest: dict, split: dict) -> None:
    """The training loop, with ``output_dir`` locked."""
    from accelerate.utils import set_seed

    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # same initial weights (heads, zero convs) on every rank
    rank, world = accelerator.process_index, accelerator.num_processes
    pairs = load_pairs(cfg.pairs).with_format("torch")
    n_train = split["train_indices"][1]  # rows come in index order: the first n_train train, the rest are held out

    parts = build_student(cfg, manifest=manifest, device=accelerator.device)  # teacher, student, D, text encoder
    teacher, student, disc = parts.teacher, parts.student, parts.discriminator
    lpips_loss = build_lpips(cfg, teacher=teacher, accelerator=accelerator) if cfg.regression == "elatentlpips" else None
    ema = EMA(student, half_life_kimg=cfg.ema_half_life_kimg, rampup=cfg.ema_rampup or None)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.learning_rate_g, betas=betas)
    d_params = [p for p in disc.parameters() if p.requires_grad] if disc is not None else []
    opt_d = torch.optim.Adam(d_params, lr=cfg.learning_rate_d, betas=betas) if disc is not None else None
    if disc is not None:
        student, disc, opt_g, opt_d = accelerator.prepare(student, disc, opt_g, opt_d)
    else:
        student, opt_g = accelerator.prepare(student, opt_g)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, state)

    resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint)
    stats_path = out / "stats.jsonl"
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {state.step} ({state.nimg} images)")
    if accelerator.is_main_process:
        # Steps past the checkpoint (or all, when starting over) are about to run again.
        ckpt.truncate_stats(stats_path, step=state.step if resume is not None else -1)
        save_config(cfg, out / "config.yaml")
        run_checks.write_split(out / run_checks.SPLIT_FILE, split)
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))

    unwrap_d = accelerator.unwrap_model(disc) if disc is not None else None
    holdout = pairs[n_train:]
    validation = validation_set(cfg, parts, holdout=holdout, manifest=manifest) if accelerator.is_main_process else None
    card = lambda: card_facts(cfg, manifest=manifest, nimg=state.nimg, step=state.step)  # noqa: E731
    if state.step == 0:
        validate_and_sample(cfg, parts, ema.model, holdout, lpips_loss, accelerator, step=0, stats_path=stats_path, validation=validation)

    bar = tqdm(total=cfg.max_train_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    micro = cfg.batch_size
    try:
        while state.step < cfg.max_train_steps:
            step = state.step
            logs: dict[str, float] = {}
            gan_on = disc is not None and cfg.gan_weight > 0 and step >= cfg.gan_start_step
            do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
            batches = []
            for m in range(cfg.gradient_accumulation_steps):
                idx = batch_indices(seed=cfg.seed, step=step * cfg.gradient_accumulation_steps + m, rank=rank, world=world,
                                    batch_size=micro, num_rows=n_train)
                rows = pairs[idx]
                cond = parts.encode(rows["prompt"])
                noise = rows["noise"].to(accelerator.device, torch.float32)
                fresh = None
                if gan_on and cfg.gan_noise == "fresh":
                    z_gen = step_generator(seed=cfg.seed, rank=rank, step=step * cfg.gradient_accumulation_steps + m, purpose="z")
                    fresh = torch.randn(noise.shape, generator=z_gen).to(accelerator.device)
                batches.append(Batch(noise, rows["target"].to(accelerator.device, torch.float32), cond, gan_noise=fresh))

            # Phase G: D frozen (its forward is the unwrapped module, so no DDP reduction is expected).
            for p in d_params:
                p.requires_grad_(False)
            fakes = []
            for m, batch in enumerate(batches):
                gen = step_generator(seed=cfg.seed, rank=rank, step=step * cfg.gradient_accumulation_steps + m, purpose="g")
                with accelerator.no_sync(student) if m + 1 < len(batches) else _null(), accelerator.autocast():
                    fake, terms = generator_terms(
                        student=student, discriminator=unwrap_d if gan_on else None, lpips_loss=lpips_loss, batch=batch,
                        regression=cfg.regression, lpips_weight=cfg.lpips_weight, gan_weight=cfg.gan_weight, generator=gen)
                    loss = sum(terms.values()) / len(batches)
                    _finite(accelerator, loss, terms, step, out)
                    accelerator.backward(loss)
                fakes.append(fake.detach())
                _accumulate(logs, terms, len(batches))
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

            # Phase D (+ lazy R1 on one real sample).
            if gan_on:
                for p in d_params:
                    p.requires_grad_(True)
                for m, (batch, fake) in enumerate(zip(batches, fakes)):
                    gen = step_generator(seed=cfg.seed, rank=rank, step=step * cfg.gradient_accumulation_steps + m, purpose="d")
                    d_stats: dict = {}
                    with accelerator.no_sync(disc) if m + 1 < len(batches) else _null(), accelerator.autocast():
                        terms = discriminator_terms(
                            discriminator=disc, discriminator_unwrapped=unwrap_d, batch=batch, fake=fake,
                            mix_fraction=cfg.mix_fraction, r1_gamma=cfg.r1_gamma, r1_interval=cfg.r1_interval,
                            do_r1=do_r1 and m == 0, generator=gen, stats=d_stats)
                        loss = micro_batch_loss(terms, num_micro_batches=len(batches))
                        _finite(accelerator, loss, terms, step, out)
                        accelerator.backward(loss)
                    _accumulate(logs, {**terms, **d_stats}, len(batches))
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(d_params, cfg.max_grad_norm)
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)

            state.step += 1
            state.nimg += micro * world * cfg.gradient_accumulation_steps
            ema.update(accelerator.unwrap_model(student), micro * world * cfg.gradient_accumulation_steps, nimg=state.nimg)
            logs = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in sorted(logs.items())}
            accelerator.log({**logs, "nimg": state.nimg}, step=state.step)
            if accelerator.is_main_process:
                with open(stats_path, "a") as fh:
                    fh.write(json.dumps({"step": state.step, "nimg": state.nimg, **logs}) + "\n")
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
            bar.update(1)

            if state.step % cfg.checkpointing_steps == 0 or state.step == cfg.max_train_steps:
                tmp = ckpt.temporary_dir(out, state.step, clear=accelerator.is_main_process)
                accelerator.wait_for_everyone()
                # A failed or interrupted save removes its partial directory; earlier checkpoints stay as they are.
                # The EMA student is saved twice: in the accelerate state and as the checkpoint's pipeline.
                size = lambda: _state_bytes(models=[student, disc, ema.model, ema.model], optimizers=[opt_g, opt_d], parts=parts)  # noqa: E731
                with ckpt.partial_save(out, tmp, estimate_bytes=size):
                    accelerator.save_state(str(tmp))
                    _check_replicas(accelerator, student, state.step)
                    if accelerator.is_main_process:
                        export_pipeline(parts, ema.model, tmp / "pipeline", split=split, card=card(), validation=validation)
                        ckpt.finalize(out, tmp, state.step, total_limit=cfg.checkpoints_total_limit)
                accelerator.wait_for_everyone()
            if state.step % cfg.validation_steps == 0 or state.step == cfg.max_train_steps:
                validate_and_sample(cfg, parts, ema.model, holdout, lpips_loss, accelerator, step=state.step, stats_path=stats_path,
                                    validation=validation)
    finally:
        bar.close()  # ends the progress line, so an error message starts on its own line
    if accelerator.is_main_process:
        export_pipeline(parts, ema.model, out / "pipeline", split=split, card=card(), validation=validation)
        accelerator.print(f"done: {state.step} steps, {state.nimg} images; one-step pipeline in {(out / 'pipeline').resolve()}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _state_bytes(*, models: list, optimizers: list, parts) -> int:
    """Rough size of one checkpoint: models (incl. the EMA), optimiser states and the exported pipeline's weights."""
    pipe = parts.teacher.pipe
    models = [*models, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None)]
    tensors = [t for m in models if m is not None for t in m.state_dict().values()]
    for opt in optimizers:
        if opt is not None:
            tensors += [t for s in opt.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_replicas(accelerator, model, step: int) -> None:
    """DDP keeps replicas equal by construction; verify it at every checkpoint (cheap, catches bugs)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(total)
    if (sums - sums[0]).abs().max().item() > 1e-6 * max(1.0, sums[0].abs().item()):
        raise RuntimeError(f"process replicas diverged at step {step}: parameter sums {sums.tolist()}")


def _accumulate(logs: dict, terms: dict, n: int) -> None:
    for k, v in terms.items():
        logs[k] = logs.get(k, 0.0) + float(v.detach()) / (1 if k in PER_STEP_TERMS else n)


def _finite(accelerator, loss: torch.Tensor, terms: dict, step: int, out: Path) -> None:
    """Stop every rank together on a NaN/inf loss, naming the step and term; checkpoints stay as they are."""
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
    if accelerator.reduce(bad, "max").item() > 0:
        names = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()] or ["(on another process)"]
        last = ckpt.checkpoint_dirs(out)
        raise ValueError(
            f"non-finite loss at step {step} in term {', '.join(names)}: stopped; last good checkpoint: "
            f"{last[-1] if last else 'none yet'} (lower the learning rates or the term's weight, then resume)"
        )


if __name__ == "__main__":
    run_cli(main)
