"""Stage two's accelerator memory, planned on a CPU: the networks of a config built at full size on fake tensors (no
weights: a teacher named by its architecture is built from the published configs, a local teacher folder from its
config files) and the trainer's own step traced (``distill/plan_memory.py``; the counting:
:mod:`distill.training.memory`).

What is traced is the trainer's code: :func:`distill.distillation.setup.build_networks` (student and discriminator from
the teacher), the teacher's UNet released and the frozen models kept as after setup, the EMA, the optimisers, and
:class:`distill.training.gan_step.GANStep` (G phase with the regression and GAN terms, D phase on real / fake /
mix-and-match pairs with lazy R1, both optimiser steps, gradient clipping, gradient accumulation) on
:class:`distill.training.loop.TrainLoop` (its end of step: the EMA update). Three steps are traced: the first (R1;
the optimisers' states are created by it), a step without R1 and a later step with R1 (every state present): the
run's peak is the highest of the three. Not traced: validation, checkpoint saving, text encoding (done before the step:
its conditioning is counted with the batch).

Levers that only change the size of tensors living through the step (8-bit Adam, the EMA's device and dtype, the
frozen models' dtype) are weights of the tracker's views, so one trace gives every combination of them; the levers
that change the computation (gradient checkpointing of the student or of D, LoRA on D) are traced one by one.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from distill.distillation import phases
from distill.distillation.phases import Batch
from distill.distillation.setup import LORA_BASE_DTYPES, Parts, build_networks, build_optimizers, build_step
from distill.distillation.students import STUDENTS, apply_student_defaults, apply_teacher_defaults
from distill.training.gan_step import build_ema
from distill.training.loop import TrainLoop
from distill.training.memory import (
    AllocationTracker,
    Peak,
    TraceAccelerator,
    allocated_bytes,
    cuda_autocast_policy,
    fused_attention,
    tensor_bytes,
    use_foreach,
)
from teachers.loading import SUPPORTED_PIPELINES, Teacher

# Planner name -> the teachers.testing family whose full-size configs are the published architecture's.
ARCHITECTURES = {"sd15": "sd15", "sd21": "sd2-v", "sdxl": "sdxl", "sd3": "sd3"}
NATIVE_RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024, "sd3": 1024}
FAMILY = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "sd3": "sd3"}
# Hub ids whose architecture is known (the teacher is then built from its config, with no download).
KNOWN_TEACHERS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
}

# The lever values the views cover (every combination), and the kinds they weigh.
OPTIMIZER_CHOICES = ("adam", "adam8bit")
EMA_CHOICES = (("same", "fp32"), ("same", "bf16"), ("cpu", "fp32"))  # a CPU EMA holds no device memory in any dtype
FROZEN_CHOICES = ("fp32", "bf16")  # fp16 holds what bf16 does
KINDS = {  # tracker kind -> the row it is reported in
    "parameters_g": "parameters: student",
    "parameters_d": "parameters: discriminator (trained)",
    "parameters_d_frozen": "parameters: discriminator (frozen base)",
    "gradients_g": "gradients",
    "gradients_d": "gradients",
    "optimizer_g": "optimiser states",
    "optimizer_d": "optimiser states",
    "optimizer_temporaries": "optimiser step temporaries",
    "ddp_buckets": "DDP gradient buckets",
    "ema": "EMA",
    "ema_bf16_copies": "EMA update temporaries",
    "ema_temporaries": "EMA update temporaries",
    "frozen": "frozen models: text encoder(s), VAE",
    "shared_base": "frozen models: the shared UNet (LoRA student / D on it)",
    "lpips": "frozen models: E-LatentLPIPS network",
    "batch": "batch: noise, targets, text conditioning",
    "activations": "activations (forward)",
    "temporaries": "backward temporaries (incl. recomputed blocks)",
    "host": None,
}
ROWS = list(dict.fromkeys(r for r in KINDS.values() if r is not None))


@dataclass(frozen=True)
class TraceLevers:
    """The levers that change what the step computes: one trace each."""

    gradient_checkpointing: bool
    d_gradient_checkpointing: bool
    d_lora_rank: int


@dataclass(frozen=True)
class SizeLevers:
    """The levers that change only the size of tensors living through the step: a view of a trace."""

    optimizer: str
    ema_device: str
    ema_dtype: str
    frozen_dtype: str

    def key(self) -> "SizeLevers":  # the equivalent view (a CPU EMA's dtype, fp16 = bf16 for the frozen models)
        ema_dtype = "fp32" if self.ema_device == "cpu" else self.ema_dtype
        return SizeLevers(
            self.optimizer, self.ema_device, ema_dtype, "bf16" if self.frozen_dtype == "fp16" else self.frozen_dtype
        )


@dataclass
class StepPeak:
    name: str
    peak: Peak
    phases: dict[str, int] = field(default_factory=dict)  # the peak of each phase of the step (G phase, D phase, ...)


@dataclass
class Trace:
    """One traced configuration: per view, the peak of each traced step; the tensors' sizes; how long it took."""

    levers: TraceLevers
    steps: dict[SizeLevers, list[StepPeak]]
    sizes: dict[str, int]
    seconds: float
    held: dict[str, int] = field(
        default_factory=dict
    )  # the most each kind held at once (all views' tensors, unweighted)

    def peak(self, view: SizeLevers) -> Peak:
        return max((s.peak for s in self.steps[view.key()]), key=lambda p: p.total)

    def measured_peak(self, view: SizeLevers) -> Peak:
        """The peak benchmarks/sd_scale.py measures: its first step (with R1) and steps without R1."""
        steps = self.steps[view.key()]
        return max((s.peak for s in steps[:2]), key=lambda p: p.total)


# --------------------------------------------------------------------------------------------------------------
# The teacher, from its configs


def resolve_architecture(teacher: str, architecture: str) -> str | None:
    """The built-in architecture to build (None: build ``teacher``, a local folder, from its config files)."""
    if architecture:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        return architecture
    if teacher and Path(teacher).is_dir():
        return None
    if teacher in KNOWN_TEACHERS:
        return KNOWN_TEACHERS[teacher]
    known = ", ".join(KNOWN_TEACHERS)
    raise ValueError(
        f"cannot tell the architecture of teacher {teacher!r}: pass --architecture "
        f"{'|'.join(ARCHITECTURES)} (or a known hub id: {known}, or a local pipeline folder)"
        if teacher
        else f"no teacher given: pass --architecture {'|'.join(ARCHITECTURES)} or --teacher (a hub id or folder)"
    )


def _folder_pipeline(folder: Path):
    """A pipeline of the folder's class with every component built from its config: no weights read."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    cls_name = index["_class_name"]
    if cls_name not in SUPPORTED_PIPELINES:
        raise ValueError(f"teacher folder {folder}: pipeline {cls_name} is not one of {', '.join(SUPPORTED_PIPELINES)}")
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        library, class_name = spec
        if class_name is None:
            components[name] = None
            continue
        module = {"diffusers": diffusers, "transformers": transformers}.get(library)
        cls = getattr(module, class_name) if module is not None else None
        if cls is None:
            components[name] = None
            continue
        path = folder / name
        if name.startswith("tokenizer"):
            components[name] = cls.from_pretrained(path)
        elif name == "scheduler":
            components[name] = _numeric_scheduler(cls.from_config(cls.load_config(path)))
        elif library == "diffusers":
            components[name] = cls.from_config(cls.load_config(path))
        else:
            components[name] = cls(transformers.AutoConfig.from_pretrained(path))
    extra = dict(requires_safety_checker=False) if cls_name == "StableDiffusionPipeline" else {}
    pipe_cls = getattr(diffusers, cls_name)
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in pipe_cls.__init__.__code__.co_varnames:
            components.setdefault(optional, None)
    return pipe_cls(**components, **extra), SUPPORTED_PIPELINES[cls_name]


def _numeric_scheduler(scheduler):
    """The scheduler with its tables as Python lists: the student's setup reads numbers from them (alpha-bar at its
    timestep), which a fake tensor does not hold; nothing in the traced step uses the scheduler."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        scheduler = type(scheduler).from_config(scheduler.config)
        for name, value in list(vars(scheduler).items()):
            if torch.is_tensor(value):
                setattr(scheduler, name, value.tolist())
    return scheduler


def build_teacher(teacher: str, architecture: str | None) -> Teacher:
    """The teacher pipeline with its real shapes and no weights (call inside FakeTensorMode)."""
    if architecture is None:
        pipe, family = _folder_pipeline(Path(teacher))
        return Teacher(pipe=pipe, family=family, name_or_path=teacher, revision=None)
    from teachers.testing import random_pipeline

    pipe = random_pipeline(ARCHITECTURES[architecture], "full")
    pipe.scheduler = _numeric_scheduler(type(pipe.scheduler).from_config(pipe.scheduler.config))
    return Teacher(pipe=pipe, family=FAMILY[architecture], name_or_path=teacher or architecture, revision=None)


def _lpips(cfg, teacher: Teacher):
    """The E-LatentLPIPS loss of :func:`distill.distillation.setup.build_regression_lpips`, unloaded: the published
    networks' layout (a local or official checkpoint), or the tests' narrow random trunk."""
    from distill.losses import ELatentLPIPS, LatentLPIPSNet

    if cfg.lpips_network == "random":
        net = LatentLPIPSNet(latent_channels=teacher.latent_channels, stage_channels=(16, 32, 64, 64, 64))
    else:
        net = LatentLPIPSNet(latent_channels=teacher.latent_channels)
    augment = None
    if cfg.lpips_augment:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from distill.losses.augment import SharedAugment

        with unset_fake_temporarily():  # kornia checks its ranges' values: host-side, a few numbers
            augment = SharedAugment(cfg.lpips_augment)
    return ELatentLPIPS(net, augment=augment, l1_weight=cfg.lpips_l1_weight)


# --------------------------------------------------------------------------------------------------------------
# Views


def adam8bit_bytes(params) -> int:
    """bitsandbytes' 8-bit Adam states (block-wise: uint8 moments, a float32 scale per 256 values; tensors under 4096
    values keep float32 moments)."""
    total = 0
    for p in params:
        n = p.numel()
        if n >= 4096:
            total += 2 * allocated_bytes(n) + 2 * allocated_bytes(4 * -(-n // 256))
        else:
            total += 2 * allocated_bytes(4 * n)
    return total


def adam_bytes(params) -> int:
    return sum(2 * allocated_bytes(4 * p.numel()) for p in params)


def _views(sizes: dict[str, int]) -> dict[SizeLevers, dict[str, float]]:
    views = {}
    for optimizer, (ema_device, ema_dtype), frozen in itertools.product(OPTIMIZER_CHOICES, EMA_CHOICES, FROZEN_CHOICES):
        w: dict[str, float] = {"host": 0.0, "ema_bf16_copies": 0.0}
        if optimizer == "adam8bit":
            w["optimizer_g"] = sizes["adam8bit_g"] / max(sizes["adam_g"], 1)
            w["optimizer_d"] = sizes["adam8bit_d"] / max(sizes["adam_d"], 1)
            w["optimizer_temporaries"] = 0.0  # its kernels update each tensor in place
        if ema_device == "cpu":
            w["ema"] = 0.0
            w["ema_temporaries"] = 0.0
        elif ema_dtype == "bf16":
            w["ema"] = sizes["ema_bf16"] / max(sizes["ema_fp32"], 1)
            w["ema_bf16_copies"] = 1.0
        if frozen != "fp32":
            w["frozen"] = sizes["frozen_bf16"] / max(sizes["frozen_fp32"], 1)
        views[SizeLevers(optimizer, ema_device, ema_dtype, frozen)] = w
    return views


# --------------------------------------------------------------------------------------------------------------
# The trace


@contextlib.contextmanager
def _traceable(fake: bool) -> Iterator[None]:
    """The step's host-side random draws (mix-and-match's permutations, the augmentations' parameters), which read
    values, made on real CPU tensors: on a GPU they are host-side or a few bytes."""
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from distill.losses.augment import SharedAugment

    mix, sample = phases.mix_and_match, SharedAugment.sample

    def real_mix(*args, **kwargs):
        with unset_fake_temporarily():
            return mix(*args, **kwargs)

    def real_sample(self, *args, **kwargs):
        with unset_fake_temporarily():
            return sample(self, *args, **kwargs)

    phases.mix_and_match, SharedAugment.sample = real_mix, real_sample
    try:
        yield
    finally:
        phases.mix_and_match, SharedAugment.sample = mix, sample


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without the warnings building fake modules prints (fake tensors have no data pointer; diffusers' notes)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def _fake_mode(fake: bool) -> Iterator[None]:
    """Fake tensors (allowing the few real host-side ones of :func:`_traceable`). A module conversion that changes
    nothing (``.to(device)`` onto the device the module is on) is skipped: torch converts a fake module's tensors by
    swapping them, which fails for a tensor that is its own conversion."""
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    apply = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        with torch.no_grad():
            if all(fn(t) is t for t in itertools.chain(self.parameters(), self.buffers())):
                return self
        return apply(self, fn, recurse)

    torch.nn.Module._apply = _apply
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.nn.Module._apply = apply


@dataclass
class Run:
    """A built stage-two run on fake (or real CPU) tensors, its tracker counting: :meth:`step` traces one step."""

    cfg: object
    parts: Parts
    ema: object
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    lpips: object
    loop: TrainLoop
    engine: object
    tracker: AllocationTracker
    sizes: dict[str, int]
    gan_on: bool
    channels: int
    latent: int
    steps: list[str] = field(default_factory=list)

    @property
    def student(self):
        return self.parts.student

    @property
    def discriminator(self):
        return self.parts.discriminator

    def step(self, name: str, step: int) -> None:
        """The trainer's step number ``step`` (lazy R1 when due), its peaks recorded under ``name``."""
        tracker, loop = self.tracker, self.loop
        loop.state.step = step
        with tracker.section(name):
            with tracker.labelled("batch"):
                tracker.where = "batch"
                batches = [
                    _batch(self.cfg, self.parts, self.channels, self.latent, micro, self.gan_on)
                    for micro in loop.micro_steps()
                ]
            self.engine.run(batches, adversarial=self.gan_on)
            del batches
            tracker.where = ""
        self.steps.append(name)

    def r1_step(self) -> int | None:
        """A step at which R1 is due after the first (None: no R1)."""
        cfg = self.cfg
        if not (self.gan_on and cfg.r1_gamma > 0):
            return None
        return cfg.r1_interval if cfg.r1_interval > 1 else 1

    def result(self, levers: TraceLevers, seconds: float) -> Trace:
        tracker = self.tracker
        steps = {
            v: [
                StepPeak(
                    name,
                    tracker.peaks[v][name],
                    {
                        where: total
                        for (section, where), total in tracker.phase_peaks[v].items()
                        if section == name and where
                    },
                )
                for name in self.steps
            ]
            for v in tracker.views
        }
        return Trace(levers=levers, steps=steps, sizes=self.sizes, seconds=seconds, held=dict(self.tracker.held))


@contextlib.contextmanager
def open_run(
    cfg,
    *,
    teacher: str,
    architecture: str | None,
    resolution: int,
    levers: TraceLevers,
    num_processes: int = 1,
    fake: bool = True,
    prime: bool = False,
) -> Iterator[Run]:
    """Build the config's networks (with ``levers``), EMA, optimisers, loop and GAN step as the trainer does, and count
    the steps run inside the block. ``fake`` False: real CPU tensors (the tests' real run). ``prime``: the optimisers'
    states created beforehand (a step with zero gradients, not counted), as after the first step.
    ``cfg``: a resolved stage-two config (StudentConfig: student defaults applied)."""
    cfg = copy.copy(cfg)
    cfg.gradient_checkpointing, cfg.d_gradient_checkpointing, cfg.d_lora_rank = (
        levers.gradient_checkpointing,
        levers.d_gradient_checkpointing,
        levers.d_lora_rank,
    )
    with _fake_mode(fake), _quiet(), tempfile.TemporaryDirectory() as out:
        torch.manual_seed(cfg.seed)
        t = build_teacher(teacher, architecture)
        apply_teacher_defaults(cfg, family=t.family)
        channels = t.latent_channels
        style = STUDENTS[cfg.student].generator is not None
        stats = ([0.0] * channels, [1.0] * channels) if style and cfg.output_latent_stats else None
        student, disc, shared = build_networks(cfg, t, device="cpu", latent_stats=stats)
        parts = Parts(
            teacher=t,
            student=student,
            discriminator=disc,
            resolution=resolution,
            shared=shared,
            base_dtype=LORA_BASE_DTYPES[cfg.lora_base_dtype],
        )
        lpips = _lpips(cfg, t) if cfg.regression == "elatentlpips" else None
        # the frozen models stay in fp32 (Parts.hold_frozen_in): the views weigh the other dtypes
        parts.release_teacher_unet()
        if shared is not None:  # the shared UNet's dtype changes the computation, not only its size: traced as set
            shared.hold_in(parts.base_dtype)
        ema = build_ema(
            student, half_life_kimg=cfg.ema_half_life_kimg, rampup=cfg.ema_rampup, device="same", dtype="fp32"
        )
        opt_g, opt_d = build_optimizers(
            cfg, student=student, discriminator=disc, optimizer="adam"
        )  # the views weigh 8-bit
        use_foreach(opt_g, opt_d)
        if prime:
            _prime(opt_g, opt_d)
        gc.collect()
        sizes = _sizes(parts, ema, lpips)
        tracker = AllocationTracker(
            _views(sizes),
            fake_only=fake,
            on_optimizer_step=lambda opt: _label_states(tracker, opt, opt_g),  # noqa: F821 (opt_g is deleted after the trace)
        )
        _label_persistent(tracker, parts, ema, lpips)
        for opt in (opt_g, opt_d):
            if opt is not None:
                _label_states(tracker, opt, opt_g)
        tracker.watch_gradients(student.parameters(), "gradients_g")
        if disc is not None:
            tracker.watch_gradients(disc.parameters(), "gradients_d")
        loop = TrainLoop(
            TraceAccelerator(cfg.mixed_precision),
            output_dir=out,
            seed=cfg.seed,
            max_train_steps=2**62,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            batch_size=cfg.batch_size,
            checkpointing_steps=0,
            validation_steps=0,
            checkpoints_total_limit=None,
            ema=ema,
            model=student,
            export=lambda path: None,
            validate=None,
            checkpoint_bytes=lambda: 0,
        )
        engine = build_step(
            cfg,
            loop,
            student=student,
            discriminator=disc,
            discriminator_unwrapped=disc,
            lpips_loss=lpips,
            opt_g=opt_g,
            opt_d=opt_d,
        )
        _watch_phases(tracker, loop, ema, bf16_copies=sizes["ema_bf16_copies"])
        run = Run(
            cfg=cfg,
            parts=parts,
            ema=ema,
            opt_g=opt_g,
            opt_d=opt_d,
            lpips=lpips,
            loop=loop,
            engine=engine,
            tracker=tracker,
            sizes=sizes,
            gan_on=disc is not None and cfg.gan_weight > 0,
            channels=channels,
            latent=resolution // t.vae_scale_factor,
        )
        ddp = sizes["trainable_g"] + sizes["trainable_d"] if num_processes > 1 else 0
        with tracker, cuda_autocast_policy(), fused_attention(), _traceable(fake), tracker.virtual("ddp_buckets", ddp):
            yield run
        del run.engine, run.loop, run.parts, run.ema, run.opt_g, run.opt_d, run.lpips
        del engine, loop, parts, ema, opt_g, opt_d, lpips, student, disc, t
        gc.collect()  # the networks' reference cycles freed while their fake mode is still open


def trace(
    cfg,
    *,
    teacher: str,
    architecture: str | None,
    resolution: int,
    levers: TraceLevers,
    num_processes: int = 1,
    steps: str = "all",
    isolate: bool = True,
) -> Trace:
    """The config's peaks (on fake tensors). ``steps`` "all": the first step (R1; the optimisers' states created by
    it), a step without R1, a later step with R1 (every state present); "peak": only the last (states primed).
    ``isolate``: in a child process (forked from a server that has imported this module, so it starts at once):
    torch 2.14's fake tensors can leave the process's heap corrupted after a trace of these networks (a crash later,
    in the garbage collector; not within the trace, whose counts a test checks against a real run), so each trace
    gets a process that ends right after it."""
    kwargs = dict(
        teacher=teacher,
        architecture=architecture,
        resolution=resolution,
        levers=levers,
        num_processes=num_processes,
        steps=steps,
    )
    return _in_child(_trace, cfg, **kwargs) if isolate else _trace(cfg, **kwargs)


def _in_child(fn, *args, **kwargs):
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(send, fn, args, kwargs), daemon=True)
    process.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"the memory trace's process ended without a result (exit code {process.exitcode})"
        ) from None
    process.join()
    if not ok:
        raise value
    return value


def _child_main(send, fn, args, kwargs) -> None:
    import os
    import traceback

    try:
        result = (True, fn(*args, **kwargs))
    except BaseException as exc:  # the parent re-raises it (a ValueError stays one line for the command)
        if os.environ.get("D2G_DEBUG"):
            traceback.print_exc()
        result = (
            False,
            exc if isinstance(exc, (ValueError, OSError)) else RuntimeError(f"{type(exc).__name__}: {exc}"),
        )
    try:
        send.send(result)
    except Exception as exc:  # an exception that does not pickle
        send.send(
            (
                False,
                RuntimeError(
                    f"{type(result[1]).__name__}: {result[1]}" if not result[0] else f"result not sent: {exc}"
                ),
            )
        )
    send.close()
    os._exit(0)  # no teardown: the fake tensors' heap is left as it is


def _trace(
    cfg, *, teacher: str, architecture: str | None, resolution: int, levers: TraceLevers, num_processes: int, steps: str
) -> Trace:
    start = time.perf_counter()
    with open_run(
        cfg,
        teacher=teacher,
        architecture=architecture,
        resolution=resolution,
        levers=levers,
        num_processes=num_processes,
        prime=steps == "peak",
    ) as run:
        r1 = run.r1_step()
        if steps == "all":
            run.step(
                "first step (R1, optimiser states created)"
                if r1 is not None
                else "first step (optimiser states created)",
                0,
            )
            if r1 != 1:
                run.step("a step without R1", 1)
        if r1 is not None and (steps != "all" or r1 > 1):
            run.step(f"step {r1} (R1, every state present)", r1)
        elif steps != "all":
            run.step("a step (every state present)", 1)
    return run.result(levers, time.perf_counter() - start)


def _prime(*optimizers) -> None:
    """Create the optimisers' states (a step on zero gradients; an Adam step of zero moves nothing)."""
    for opt in optimizers:
        if opt is None:
            continue
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _batch(cfg, parts: Parts, channels: int, latent: int, micro: int, gan_on: bool) -> Batch:
    """What the trainer's read_batch puts on the device: the pairs' noise and targets, fresh GAN noise, the prompts'
    conditioning (encoded by the teacher's text encoder(s), as without stored embeddings)."""
    shape = (cfg.batch_size, channels, latent, latent)
    noise, target = torch.randn(shape), torch.randn(shape)
    fresh = torch.randn(shape) if gan_on and cfg.gan_noise == "fresh" else None
    cond = parts.encode([f"a photo of prompt {micro}-{i}" for i in range(cfg.batch_size)])
    return Batch(noise, target, cond, gan_noise=fresh)


def _sizes(parts: Parts, ema, lpips) -> dict[str, int]:
    """Exact allocated bytes of the tensors that live through the step, and of their variants under the size levers."""
    p = parts.teacher.pipe
    student, disc = parts.student, parts.discriminator
    frozen = [
        t
        for m in (
            p.vae,
            p.text_encoder,
            getattr(p, "text_encoder_2", None),
            getattr(p, "text_encoder_3", None),
            getattr(p, "transformer", None),
        )
        if m is not None
        for t in (*m.parameters(), *m.buffers())
    ]
    g_train = [q for q in student.parameters() if q.requires_grad]
    d_train = [q for q in disc.parameters() if q.requires_grad] if disc is not None else []
    ema_tensors = [*ema.model.parameters(), *ema.model.buffers()]
    return {
        "params_g": tensor_bytes(student.parameters()),
        "params_d": tensor_bytes(disc.parameters()) if disc is not None else 0,
        "trainable_g": tensor_bytes(g_train),
        "trainable_d": tensor_bytes(d_train),
        "adam_g": adam_bytes(g_train),
        "adam_d": adam_bytes(d_train),
        "adam8bit_g": adam8bit_bytes(g_train),
        "adam8bit_d": adam8bit_bytes(d_train),
        "ema_fp32": tensor_bytes(ema_tensors),
        "ema_bf16": tensor_bytes(ema_tensors, dtype=torch.bfloat16),
        "ema_bf16_copies": tensor_bytes(student.parameters(), dtype=torch.bfloat16),
        "frozen_fp32": tensor_bytes(frozen),
        "frozen_bf16": tensor_bytes(frozen, dtype=torch.bfloat16),
        "lpips": tensor_bytes([*lpips.parameters(), *lpips.buffers()]) if lpips is not None else 0,
        "n_params_g": sum(q.numel() for q in student.parameters()),
        "n_params_d": sum(q.numel() for q in disc.parameters()) if disc is not None else 0,
        "n_trainable_d": sum(q.numel() for q in d_train),
        "n_frozen": sum(t.numel() for t in frozen),
    }


def _label_persistent(tracker: AllocationTracker, parts: Parts, ema, lpips) -> None:
    p = parts.teacher.pipe
    tracker.label_module(parts.student, "parameters_g")
    tracker.label_module(parts.discriminator, "parameters_d", frozen_kind="parameters_d_frozen")
    tracker.label_module(ema.model, "ema")
    # An SD3 teacher keeps its transformer after setup (Parts.release_teacher_unet): held like the frozen encoders.
    for module in (
        p.vae,
        p.text_encoder,
        getattr(p, "text_encoder_2", None),
        getattr(p, "text_encoder_3", None),
        getattr(p, "transformer", None),
        getattr(p, "unet", None),
    ):
        tracker.label_module(module, "frozen")
    tracker.label_module(lpips, "lpips")
    if parts.shared is not None:  # the base's own weights (its adapters are the roles' parameters, labelled above)
        roles = {id(q) for m in (parts.student, parts.discriminator) if m is not None for q in m.parameters()}
        base = parts.shared.unet
        tracker.label([q for q in base.parameters() if id(q) not in roles], "shared_base")
        tracker.label(base.buffers(), "shared_base")


def _label_states(tracker: AllocationTracker, opt, opt_g) -> None:
    """After an optimiser step: its states (Adam's step counters stay on the host on a GPU, as non-capturable Adam keeps
    them)."""
    kind = "optimizer_g" if opt is opt_g else "optimizer_d"
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                tracker.label([value], "host" if key == "step" else kind)


def _watch_phases(tracker: AllocationTracker, loop: TrainLoop, ema, *, bf16_copies: int) -> None:
    """Name where the peaks happen (G phase, D phase, EMA update); a bf16 EMA's update holds bf16 copies of the
    student's weights (the traced fp32 one casts nothing): counted for the views of that lever."""
    phase, update = loop.phase, ema.update

    def named_phase(*args, purpose: str, **kwargs):
        tracker.where = {"g": "G phase", "d": "D phase"}.get(purpose, purpose)
        return phase(*args, purpose=purpose, **kwargs)

    def named_update(*args, **kwargs):
        tracker.where = "EMA update"
        with tracker.labelled("ema_temporaries"), tracker.virtual("ema_bf16_copies", bf16_copies):
            return update(*args, **kwargs)

    loop.phase, ema.update = named_phase, named_update


# --------------------------------------------------------------------------------------------------------------
# Plans over the levers


@dataclass
class Plan:
    """The config's traces: the config as given, and the trace levers' variants asked for."""

    traces: dict[TraceLevers, Trace] = field(default_factory=dict)

    def peak(self, trace_levers: TraceLevers, size_levers: SizeLevers) -> Peak:
        return self.traces[trace_levers].peak(size_levers)


def levers_of(cfg) -> tuple[TraceLevers, SizeLevers]:
    return (
        TraceLevers(bool(cfg.gradient_checkpointing), bool(cfg.d_gradient_checkpointing), int(cfg.d_lora_rank)),
        SizeLevers(cfg.optimizer, cfg.ema_device, cfg.ema_dtype, cfg.frozen_dtype),
    )


def available_levers(cfg, *, family: str, lora_rank: int) -> dict[str, dict]:
    """The memory levers this config does not use yet and its student / D support: name -> the keys it sets."""
    apply_student_defaults(cfg)
    unet_d = family != "sd3" and cfg.gan_weight > 0
    levers = {}
    if not cfg.gradient_checkpointing and STUDENTS[cfg.student].generator is None:
        levers["gradient_checkpointing"] = {"gradient_checkpointing": True}
    if unet_d and not cfg.d_gradient_checkpointing:
        levers["d_gradient_checkpointing"] = {"d_gradient_checkpointing": True}
    if cfg.gan_weight > 0 and cfg.d_lora_rank == 0 and lora_rank > 0:
        levers[f"d_lora_rank {lora_rank}"] = {"d_lora_rank": lora_rank}
    if cfg.ema_device != "cpu":
        levers["ema_device cpu"] = {"ema_device": "cpu"}
        if cfg.ema_dtype != "bf16":
            levers["ema_dtype bf16"] = {"ema_dtype": "bf16"}
    if cfg.frozen_dtype == "fp32":
        levers["frozen_dtype bf16"] = {"frozen_dtype": "bf16"}
    if cfg.optimizer != "adam8bit":
        levers["optimizer adam8bit"] = {"optimizer": "adam8bit"}
    return levers


def combined(cfg, keys: dict) -> tuple[TraceLevers, SizeLevers]:
    t, s = levers_of(cfg)
    t = replace(t, **{k: v for k, v in keys.items() if k in TraceLevers.__dataclass_fields__})
    s = replace(s, **{k: v for k, v in keys.items() if k in SizeLevers.__dataclass_fields__})
    if keys.get("ema_device") == "cpu":
        s = replace(s, ema_dtype="fp32")
    return t, s


def lever_sets(levers: dict[str, dict]) -> list[tuple[str, ...]]:
    """Every combination of the levers, except a CPU EMA with a bf16 one (alternatives)."""
    names = list(levers)
    out = []
    for r in range(len(names) + 1):
        for combo in itertools.combinations(names, r):
            if "ema_device cpu" in combo and "ema_dtype bf16" in combo:
                continue
            out.append(combo)
    return out
