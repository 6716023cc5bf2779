"""Plan a stage-two run's GPU memory on a CPU, before renting the GPU: the peak of the training step by kind, and with
--gpu_memory which memory levers bring it under a card's size.

    python distill/plan_memory.py --config configs/student/sd15_unet.yaml --architecture sd15 --batch_size 16
    d2g-plan-memory --config configs/student/sdxl_unet.yaml --teacher stabilityai/stable-diffusion-xl-base-1.0
    --gpu_memory 80

Takes train_student.py's config (the same file and --key value overrides) plus the teacher's architecture (sd15, sd21,
sdxl, sd3; or a known hub id; or a local pipeline folder, whose config files are read) and the resolution. The
networks are built at full size on fake tensors (no weights: nothing is downloaded or allocated) and the trainer's
own step is traced: G phase (regression + GAN), D phase (real / fake / mix-and-match, lazy R1), both optimiser steps,
the EMA update, as a CUDA device runs it (autocast's CUDA op lists, fused attention). Peaks are
torch.cuda.max_memory_allocated's measure, in decimal GB; planned vs measured on an H200:
docs/scale-and-memory.md#plan-before-you-rent-d2g-plan-memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from distill.core.config import ConfigError, command, parse_config, require_non_negative, require_positive
from distill.train_student import StudentConfig

ARCHITECTURE_CHOICES = ("sd15", "sd21", "sdxl", "sd3")


@dataclass
class PlanConfig(StudentConfig):
    architecture: Optional[str] = field(
        default=None,
        metadata={
            "help": "the teacher's architecture, built from its published config (unset: from a known hub id in "
            "`teacher`, or the config files of a local teacher folder)",
            "choices": ARCHITECTURE_CHOICES,
        },
    )
    resolution: int = field(
        default=0,
        metadata={
            "help": "image side in pixels the pairs were made at (0: the architecture's native one: 512 sd15, 768 "
            "sd21, 1024 sdxl / sd3; a folder: its sample size)"
        },
    )
    gpu_memory: float = field(
        default=0.0,
        metadata={
            "help": "the card's memory in GB (decimal): list which levers, alone and combined, bring the peak under "
            "it (0: only the plan of the config)"
        },
    )
    memory_margin: float = field(
        default=0.05,
        metadata={
            "help": "share of gpu_memory kept free (the CUDA context, the allocator's fragmentation): a plan fits "
            "when its peak is at most (1 - margin) x gpu_memory"
        },
    )
    lever_d_lora_rank: int = field(
        default=64, metadata={"help": "the LoRA rank on D tried as a lever when d_lora_rank is 0 (0: not tried)"}
    )
    num_processes: int = field(
        default=1,
        metadata={
            "help": "processes (GPUs) of the run: above 1, DDP's gradient buckets (one copy of the trained weights' "
            "size) are added"
        },
    )


def check(cfg: PlanConfig) -> None:
    from distill.distillation.setup import check_shared_base
    from distill.distillation.students import apply_student_defaults
    from distill.training.run_config import check_gan_keys

    check_shared_base(cfg)  # the LoRA keys, as train_student.py checks them (before the per-student defaults)
    apply_student_defaults(cfg)
    optimizer, cfg.optimizer = (
        cfg.optimizer,
        "adam",
    )  # 8-bit Adam is planned from its state layout: bitsandbytes not needed
    try:
        check_gan_keys(cfg)
    finally:
        cfg.optimizer = optimizer
    require_positive(cfg, "num_processes")
    require_non_negative(cfg, "resolution", "gpu_memory", "d_lora_rank", "lever_d_lora_rank", "gan_weight")
    if not 0 <= cfg.memory_margin < 1:
        raise ConfigError(f"memory_margin must be in [0, 1), got {cfg.memory_margin}")


def gb(nbytes: float) -> str:
    """Decimal GB: one decimal from 1 GB up, three significant digits below (the tests' tiny teachers)."""
    value = nbytes / 1e9
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


@command
def main() -> None:
    cfg = parse_config(PlanConfig, description=__doc__)
    check(cfg)
    import torch

    from distill.distillation import memory_plan as mp

    torch.set_num_threads(max(1, torch.get_num_threads()))
    architecture = mp.resolve_architecture(cfg.teacher, cfg.architecture or "")
    resolution = cfg.resolution or (
        mp.NATIVE_RESOLUTION[architecture] if architecture else _folder_resolution(cfg.teacher)
    )
    family = mp.FAMILY[architecture] if architecture else _folder_family(cfg.teacher)
    from distill.distillation.students import apply_teacher_defaults

    apply_teacher_defaults(cfg, family=family)
    from distill.distillation.setup import check_shared_base_family

    check_shared_base_family(cfg, family=family)
    if cfg.d_gradient_checkpointing and family == "sd3":
        raise ConfigError(
            "d_gradient_checkpointing is implemented for the UNet discriminator only: turn it off for an SD3 teacher"
        )
    if cfg.gradient_checkpointing and cfg.student in ("gigagan", "stylegan_t"):
        raise ConfigError(f"student {cfg.student!r} does not support gradient_checkpointing; turn it off")
    started = time.perf_counter()
    base_trace, base_size = mp.levers_of(cfg)
    teacher = cfg.teacher if architecture is None else (cfg.teacher or architecture)
    run = lambda levers, steps: mp.trace(
        cfg,
        teacher=teacher,
        architecture=architecture,
        resolution=resolution,  # noqa: E731
        levers=levers,
        num_processes=cfg.num_processes,
        steps=steps,
    )
    traces = {base_trace: run(base_trace, "all")}
    base = traces[base_trace]
    _print_plan(cfg, base, base_size, architecture=architecture or cfg.teacher, resolution=resolution)
    if cfg.gpu_memory > 0:
        levers = mp.available_levers(cfg, family=family, lora_rank=cfg.lever_d_lora_rank)
        sets = mp.lever_sets(levers)
        for combo in sets:
            keys = {k: v for name in combo for k, v in levers[name].items()}
            t, _ = mp.combined(cfg, keys)
            if t not in traces:
                traces[t] = run(t, "peak")  # the run's peak only: a step with R1, every state present
        _print_levers(cfg, traces, levers, sets)
    print(
        f"planned in {time.perf_counter() - started:.0f} s ({len(traces)} trace{'s' if len(traces) > 1 else ''}, "
        f"{base.seconds:.0f} s for the config's own; {torch.get_num_threads()} CPU threads)"
    )


def _folder_resolution(folder: str) -> int:
    import json
    from pathlib import Path

    root = Path(folder)
    for name in ("unet", "transformer"):
        path = root / name / "config.json"
        if path.is_file():
            sample = int(json.loads(path.read_text())["sample_size"])
            vae = json.loads((root / "vae" / "config.json").read_text())
            return sample * 2 ** (len(vae["block_out_channels"]) - 1)
    raise ConfigError(f"teacher folder {folder} has no unet/ or transformer/ config: pass --resolution")


def _folder_family(folder: str) -> str:
    import json
    from pathlib import Path

    from teachers.loading import SUPPORTED_PIPELINES

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"teacher folder {folder} has no model_index.json: not a diffusers pipeline folder")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise ConfigError(f"teacher folder {folder}: pipeline {name} is not one of {', '.join(SUPPORTED_PIPELINES)}")
    return SUPPORTED_PIPELINES[name]


def _print_plan(cfg, trace, size_levers, *, architecture: str, resolution: int) -> None:
    from distill.distillation.memory_plan import KINDS, ROWS

    s = trace.sizes
    micro = (
        f"{cfg.gradient_accumulation_steps} micro-batches" if cfg.gradient_accumulation_steps > 1 else "1 micro-batch"
    )
    size = f" ({cfg.student_size})" if cfg.student in ("gigagan", "stylegan_t") else ""
    print(
        f"plan: {architecture} teacher, {cfg.student} student{size}, {resolution} px, batch {cfg.batch_size} x {micro}"
        f"{f' x {cfg.num_processes} processes (DDP)' if cfg.num_processes > 1 else ''}, mixed precision "
        f"{cfg.mixed_precision or 'no'}"
        f", regression {cfg.regression}{', no GAN term' if cfg.gan_weight <= 0 else ''}"
    )
    print(
        f"networks: student {s['n_params_g'] / 1e9:.3f} B parameters, D {s['n_params_d'] / 1e9:.3f} B "
        f"(trained {s['n_trainable_d'] / 1e9:.3f} B), frozen text encoder(s) + VAE {s['n_frozen'] / 1e9:.3f} B"
    )
    levers = trace.levers
    print(
        f"levers: gradient_checkpointing {str(levers.gradient_checkpointing).lower()}, d_gradient_checkpointing "
        f"{str(levers.d_gradient_checkpointing).lower()}, d_lora_rank {levers.d_lora_rank}, ema_device "
        f"{size_levers.ema_device}, "
        f"ema_dtype {size_levers.ema_dtype}, frozen_dtype {size_levers.frozen_dtype}, optimizer {size_levers.optimizer}"
    )
    peak = trace.peak(size_levers)
    print(f"\npeak {gb(peak.total)} GB (decimal), at {peak.where}; by kind:")
    rows = dict.fromkeys(ROWS, 0.0)
    weights = _weights(trace, size_levers)
    for kind, nbytes in peak.kinds.items():
        row = KINDS.get(kind, kind)
        if row is not None:
            rows[row] += weights.get(kind, 1.0) * nbytes
    for row, nbytes in rows.items():
        if nbytes > 1e-3 * peak.total:
            print(f"  {row:52s} {gb(nbytes):>7s}")
    print(f"  {'total':52s} {gb(peak.total):>7s}")
    print("per step (its phases' peaks):")
    for step in trace.steps[size_levers.key()]:
        phases = ", ".join(f"{where} {gb(total)}" for where, total in step.phases.items() if where != "batch")
        print(f"  {step.name:52s} {gb(step.peak.total):>7s}  ({phases})")


def _weights(trace, size_levers) -> dict[str, float]:
    from distill.distillation.memory_plan import _views

    return _views(trace.sizes)[size_levers.key()]


def _print_levers(cfg, traces, levers: dict, sets: list) -> None:
    from distill.distillation import memory_plan as mp

    usable = cfg.gpu_memory * 1e9 * (1 - cfg.memory_margin)
    print(
        f"\nbudget: {cfg.gpu_memory:g} GB card, planned peak at most {gb(usable)} GB "
        f"({100 * (1 - cfg.memory_margin):.0f} %; "
        "accuracy: docs/scale-and-memory.md#planned-vs-measured)"
    )
    if cfg.student == "unet":
        print(
            "  caveat: with d_gradient_checkpointing an H200 held up to 34 GB more than planned for SD1.5's float32 "
            "UNet "
            "student at 512 px, batch 16 (its G phase; not yet explained): take such a plan as a lower bound"
        )

    def peak(combo) -> float:
        keys = {k: v for name in combo for k, v in levers[name].items()}
        t, s = mp.combined(cfg, keys)
        return traces[t].peak(s).total

    def line(label: str, value: float) -> str:
        return f"  {label:64s} {gb(value):>7s}  {'fits' if value <= usable else 'does not fit'}"

    print(f"  {'levers (added to the config)':64s} {'peak GB':>7s}")
    print(line("none (as configured)", peak(())))
    for name in levers:
        print(line(f"+ {name}", peak((name,))))
    fitting = [c for c in sets if c and peak(c) <= usable]
    minimal = [c for c in fitting if not any(set(o) < set(c) for o in fitting)]
    minimal.sort(key=lambda c: (len(c), peak(c)))
    everything = max(sets, key=len) if sets else ()
    if peak(()) <= usable:
        print("the config fits as it is")
    elif minimal:
        print("smallest sets of levers that fit:")
        for combo in minimal[:8]:
            print(line("+ " + ", ".join(combo), peak(combo)))
    else:
        lowest = min(sets, key=peak)
        print(
            f"no combination of these levers fits; the lowest: {gb(peak(lowest))} GB with "
            f"{', '.join(lowest) if lowest else 'none'} (smaller batch_size with gradient_accumulation_steps: the "
            "activations "
            "scale with the micro-batch)"
        )
    if everything and everything not in minimal:
        print(line("all levers: + " + ", ".join(everything), peak(everything)))


if __name__ == "__main__":
    main()
