"""Stage two at SD1.5 and SDXL size: memory per lever combination and per student, and step time / peak memory
per lever and per student on a GPU.

The UNet student and UNet discriminator are built from the published UNet2DConditionModel configs of
runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 (written below; random weights:
speed and memory do not depend on them), the GAN students from their ``paper`` size presets (the published
generators' parameter counts), with the library's classes (``UNetStudent``, ``GigaGANGenerator``,
``StyleGANTGenerator``, ``UNetDiscriminator``, ``EMA``, ``build_optimizer``) and loss phases
(the shared GAN step's ``g_terms`` / ``d_terms`` on stage two's ``PairsView``).

1. Memory tables, any machine: exact bytes of the tensors a run keeps on the accelerator (weights, one model's
   gradients at a time, optimiser states, EMA, teacher UNet, frozen text encoders + VAE), built on the meta device
   (no memory used), one table per student. Activations are not in it. adam8bit states follow bitsandbytes' layout
   (uint8 moments, an fp32 scale per 256-element block; tensors under 4096 elements keep fp32 moments).
2. On CUDA: per lever (UNet student) and per student (default levers), step time, images/s and
   torch.cuda.max_memory_allocated of a full step (G phase, D phase with R1, both optimiser steps, EMA update;
   bf16 autocast, MSE regression; the GAN students make their fakes from fresh noise, their default) at SD1.5
   512 px batch 16 / SDXL 1024 px batch 4, and each student's one-step latency at 512 / 1024 px.
   Without CUDA a reduced run: SD1.5 only (``--sdxl`` adds SDXL), 64 px, batch 1, the D phase with R1 (no
   optimiser step: student + D with Adam states would need 28 GB at SD1.5 size) with and without
   d_gradient_checkpointing, and each student's one-step latency at 64x64 latents (one image) with its ratio to
   the UNet student's, measured side by side. The first printed line says which.

    python benchmarks/sd_scale.py            # CPU: memory table (both), reduced SD1.5 timing
    python benchmarks/sd_scale.py --sdxl     # GPU: the full measurements (SD1.5 and SDXL)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import torch
from diffusers import UNet2DConditionModel

from distill.discriminators import UNetDiscriminator
from distill.distillation.phases import Batch, PairsView
from distill.training.ema import EMA
from distill.training.gan_step import GANStep
from distill.training.optimizers import build_optimizer
from students import GigaGANGenerator, StyleGANTGenerator, TextConditioning, UNetStudent
from teachers.testing import random_text_encoder, random_vae  # the published text encoder / VAE shapes

UNETS = {  # UNet2DConditionModel kwargs of the released unet/config.json files
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    ),
}
FROZEN = {
    "sd15": lambda: [random_text_encoder(768, 12, 12), random_vae("full", 0.18215)],
    "sdxl": lambda: [
        random_text_encoder(768, 12, 12),
        random_text_encoder(1280, 32, 20, projection_dim=1280, act="gelu"),
        random_vae("full", 0.13025),
    ],
}
GPU_RUNS = {"sd15": (512, 16), "sdxl": (1024, 4)}  # resolution, batch
GAN_STUDENTS = {"gigagan": GigaGANGenerator, "stylegan_t": StyleGANTGenerator}
STUDENT_NAMES = {"unet": "UNet student", "gigagan": "GigaGAN (paper)", "stylegan_t": "StyleGAN-T (paper)"}
# Lever combinations of the memory table: (name, teacher held, ema_device, ema_dtype, frozen bytes/param, optimizer)
COMBOS = [
    ("before #12 (teacher UNet held)", True, "same", 4, 4, "adam"),
    ("default (teacher released)", False, "same", 4, 4, "adam"),
    ("ema_device cpu", False, "cpu", 4, 4, "adam"),
    ("ema_dtype bf16", False, "same", 2, 4, "adam"),
    ("frozen_dtype bf16", False, "same", 4, 2, "adam"),
    ("optimizer adam8bit", False, "same", 4, 4, "adam8bit"),
    ("all (cpu EMA, bf16 frozen, adam8bit)", False, "cpu", 4, 2, "adam8bit"),
]
GPU_LEVERS = {
    "default": {},
    "d_gradient_checkpointing": dict(d_ckpt=True),
    "gradient_checkpointing (G)": dict(g_ckpt=True),
    "ema_device cpu": dict(ema_device="cpu"),
    "ema_dtype bf16": dict(ema_dtype=torch.bfloat16),
    "optimizer adam8bit": dict(optimizer="adam8bit"),
    "all": dict(d_ckpt=True, g_ckpt=True, ema_device="cpu", optimizer="adam8bit"),
}


def gan_student(kind: str, arch: str, size: str = "paper") -> torch.nn.Module:
    """A GAN student as stage two sizes it for the teacher (``distill/distillation/students.py``): its latents and
    text widths."""
    unet = UNETS[arch]
    return GAN_STUDENTS[kind].for_latents(
        latent_channels=unet["in_channels"],
        sample_size=unet["sample_size"],
        cross_attention_dim=unet["cross_attention_dim"],
        pooled_dim=1280 if arch == "sdxl" else 0,
        size=size,
    )


def build(arch: str, device, *, student: str = "unet", d_ckpt: bool = False, g_ckpt: bool = False):
    """Student (the UNet at t=999, or a GAN generator of the ``paper`` preset; fp32 master weights) and D (the
    teacher's UNet with all four head kinds: a copy of the UNet student, the teacher's own UNet for a GAN student),
    random weights."""
    heads = ("before", "skip", "after", "final")
    with torch.device(device):
        if student == "unet":
            model = UNetStudent(unet_config=UNETS[arch])
            disc = UNetDiscriminator(model.unet, heads=heads)
        else:
            model = gan_student(student, arch)
            # Training copies the teacher's UNet and releases the teacher: the same tensors as taking it over.
            disc = UNetDiscriminator(UNet2DConditionModel(**UNETS[arch]), heads=heads, copy_backbone=False)
    if g_ckpt:
        model.enable_gradient_checkpointing()
    if d_ckpt:
        disc.enable_gradient_checkpointing()
    return model, disc


def adam_bytes(params, optimizer: str) -> int:
    if optimizer == "adam":
        return sum(8 * p.numel() + 4 for p in params)  # exp_avg, exp_avg_sq (fp32) + step
    return sum(2 * p.numel() + 8 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel() for p in params)


def memory_table(arch: str, student_kind: str = "unet") -> None:
    student, disc = build(arch, "meta", student=student_kind)
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (student, disc))
    with torch.device("meta"):
        n_frozen = sum(p.numel() for m in FROZEN[arch]() for p in m.parameters())
    gb = lambda b: f"{b / 1e9:6.2f}"  # noqa: E731  decimal GB, as the issue quotes them
    print(
        f"\n{arch}, {STUDENT_NAMES[student_kind]}: student {n_g / 1e9:.3f} B params, D {n_d / 1e9:.3f} B, "
        f"text encoders + VAE {n_frozen / 1e9:.3f} B (GB on the accelerator; activations not included)"
    )
    print(
        f"{'levers':38s} {'weights':>7s} {'grads':>7s} {'optim':>7s} {'EMA':>7s} {'teacher':>7s} {'frozen':>7s} "
        f"{'total':>7s}"
    )
    for name, teacher, ema_device, ema_bytes, frozen_bytes, optimizer in COMBOS:
        if teacher and student_kind != "unet":
            continue  # the teacher-held row is the UNet student's history
        row = [
            4 * (n_g + n_d),
            4 * max(n_g, n_d),
            adam_bytes([*student.parameters(), *disc.parameters()], optimizer),
            0 if ema_device == "cpu" else ema_bytes * n_g,
            4 * n_g if teacher else 0,
            frozen_bytes * n_frozen,
        ]
        print(f"{name:38s} " + " ".join(gb(b) for b in row) + f" {gb(sum(row))}")


def conditioning(arch: str, n: int, res: int, device) -> TextConditioning:
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(n, 77, UNETS[arch]["cross_attention_dim"], generator=g).to(device)
    if arch != "sdxl":
        return TextConditioning(embeds)
    return TextConditioning(
        embeds,
        torch.randn(n, 1280, generator=g).to(device),
        torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device).repeat(n, 1),
    )


def batch(arch: str, n: int, res: int, device, *, fresh_noise: bool = False) -> Batch:
    """Pairs' noise and targets; ``fresh_noise``: GAN fakes from other noise (the GAN students' ``gan_noise:
    fresh``)."""
    g = torch.Generator().manual_seed(0)
    noise, target, fresh = (torch.randn(n, 4, res // 8, res // 8, generator=g).to(device) for _ in range(3))
    return Batch(noise, target, conditioning(arch, n, res, device), gan_noise=fresh if fresh_noise else None)


def engine(student, disc, *, regression: str) -> GANStep:
    """The trainer's GAN step on stage two's pairs (its terms only: no loop, optimisers or logs)."""
    view = PairsView(
        student=student,
        discriminator=disc,
        discriminator_unwrapped=disc,
        lpips_loss=None,
        regression=regression,
        lpips_weight=1.0,
        mix_fraction=0.25,
    )
    return GANStep(
        None,
        view=view,
        generator=student,
        discriminator=disc,
        discriminator_unwrapped=disc,
        opt_g=None,
        opt_d=None,
        loss="non_saturating",
        gan_weight=0.1,
        r1_gamma=1e-5,
        r1_interval=16,
        max_grad_norm=1.0,
    )


def d_phase(disc, b: Batch, fake, *, r1: bool, device_type: str, per_term: bool = False) -> None:
    """D's loss terms and their backward; ``per_term``: one backward per term (the same gradients; on the CPU the
    backward then buffers fewer partial weight gradients at once, which keeps SD1.5 under 12 GiB)."""
    # bf16 autocast on CUDA as in training; fp32 on the CPU, where autocast's bf16 weight copies would cost 2 GB more.
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        terms = engine(None, disc, regression="mse").d_terms(b, fake, torch.Generator().manual_seed(2), r1=r1)
    terms = {k: v for k, v in terms.items() if not k.endswith("_logit")}  # logged only, no gradient
    if not per_term:
        sum(terms.values()).backward()
        return
    for term in terms.values():
        term.backward(retain_graph=True)  # d_gan and d_mix share a forward


def train_step(student, disc, opt_g, opt_d, ema, b: Batch, *, r1: bool, nimg: int, device_type: str = "cuda") -> None:
    """One stage-two step as train_student.py runs it: G (D frozen), D (+ R1), EMA."""
    disc.requires_grad_(False)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        fake, terms = engine(student, disc, regression="mse").g_terms(b, torch.Generator().manual_seed(3))
    sum(terms.values()).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    disc.requires_grad_(True)
    d_phase(disc, b, fake, r1=r1, device_type=device_type)
    torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    ema.update(student, b.noise.shape[0], nimg=nimg)


def timed(fn, device_type: str) -> float:
    if device_type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def one_image(student, arch: str, res: int, device, dtype=torch.float32):
    """A call of the student on one image's inputs (no grad), for timing."""
    b = batch(arch, 1, res, device)
    cond = b.cond.added_cond_kwargs()
    cond = {k: v.to(dtype) if k == "text_embeds" else v for k, v in cond.items()} if cond else cond
    noise, embeds = b.noise.to(dtype), b.cond.prompt_embeds.to(dtype)

    @torch.no_grad()
    def run():
        return student(noise, embeds, added_cond_kwargs=cond)

    return run


def latency(student, arch: str, res: int, device, repeats: int, dtype=torch.float32) -> float:
    """Median seconds of one image's forward, after a warm-up call."""
    run = one_image(student, arch, res, device, dtype)
    run()
    return statistics.median(timed(run, torch.device(device).type) for _ in range(repeats))


def cpu_latency_ratios(arch: str, repeats: int) -> None:
    """Each student's one-image latency at 64x64 latents (512 px) over the UNet student's, on the CPU, measured in
    interleaved rounds (each model once per round) so that a machine's load drifts into every model alike."""
    res = 512
    runs = {}
    for kind in STUDENT_NAMES:
        student = (UNetStudent(unet_config=UNETS[arch]) if kind == "unet" else gan_student(kind, arch)).eval()
        runs[kind] = one_image(student, arch, res, "cpu")
        runs[kind]()  # warm-up
    times = {kind: [] for kind in runs}
    for _ in range(repeats):
        for kind, run in runs.items():
            times[kind].append(timed(run, "cpu"))
    unet = statistics.median(times["unet"])
    for kind in GAN_STUDENTS:
        print(
            f"{kind}_over_unet_latency={statistics.median(times[kind]) / unet:.3f}  "
            f"({STUDENT_NAMES[kind]} vs the UNet student, {res} px = {res // 8}x{res // 8} latents, one image, fp32)"
        )


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(arch: str, lever: dict, n: int, res: int, steps: int, student_kind: str = "unet") -> tuple[float, float]:
    """Mean seconds per step (R1 off) and peak GB (the warm-up step runs R1) of one lever's full training step."""
    torch.cuda.reset_peak_memory_stats()
    student, disc = build(
        arch, "cuda", student=student_kind, d_ckpt=lever.get("d_ckpt", False), g_ckpt=lever.get("g_ckpt", False)
    )
    ema = EMA(
        student,
        half_life_kimg=500,
        device="cpu" if lever.get("ema_device") == "cpu" else None,
        dtype=lever.get("ema_dtype"),
    )
    opt_g, opt_d = (
        build_optimizer(lever.get("optimizer", "adam"), m.parameters(), lr=1e-5, betas=(0.0, 0.99))
        for m in (student, disc)
    )
    b = batch(arch, n, res, "cuda", fresh_noise=student_kind != "unet")
    times = [
        timed(lambda: train_step(student, disc, opt_g, opt_d, ema, b, r1=i == 0, nimg=(i + 1) * n), "cuda")
        for i in range(steps + 1)
    ]
    return statistics.mean(times[1:]), torch.cuda.max_memory_allocated() / 1e9


def gpu_runs(arch: str, steps: int) -> None:
    res, n = GPU_RUNS[arch]
    print(
        f"\n{arch} on {torch.cuda.get_device_name()}: {res} px, batch {n}, mean of {steps} steps after a warm-up "
        "step with R1 "
        "(peak includes it)"
    )
    print(f"{'lever':28s} {'s/step':>8s} {'img/s':>7s} {'peak GB':>8s}")
    for name, lever in GPU_LEVERS.items():
        if lever.get("optimizer") == "adam8bit" and importlib.util.find_spec("bitsandbytes") is None:
            if name != "all":
                print(f"{name:28s} skipped: pip install bitsandbytes")
                continue
            name, lever = "all but adam8bit (no bnb)", {**lever, "optimizer": "adam"}
        gpu_row(name, arch, lever, n, res, steps)
    for kind in GAN_STUDENTS:
        gpu_row(f"{STUDENT_NAMES[kind]}, default", arch, {}, n, res, steps, student_kind=kind)
    for kind in STUDENT_NAMES:
        with torch.device("cuda"):
            student = UNetStudent(unet_config=UNETS[arch]) if kind == "unet" else gan_student(kind, arch)
        for dtype in (torch.float32, torch.bfloat16):
            try:
                ms = latency(student.to(dtype).eval(), arch, res, "cuda", 10, dtype=dtype) * 1000
                print(f"one-step latency {res} px, batch 1, {STUDENT_NAMES[kind]} in {str(dtype)[6:]}: {ms:.1f} ms")
            except Exception as e:  # one failed measurement must not cost the rest of a GPU lease
                print(
                    f"one-step latency {res} px, {STUDENT_NAMES[kind]} in {str(dtype)[6:]}: failed: "
                    f"{type(e).__name__}: {e}"[:300]
                )
        del student
        free()


def gpu_row(name: str, arch: str, lever: dict, n: int, res: int, steps: int, student_kind: str = "unet") -> None:
    try:
        step, peak = measure(arch, lever, n, res, steps, student_kind)
        print(f"{name:28s} {step:8.3f} {n / step:7.2f} {peak:8.2f}")
    except torch.cuda.OutOfMemoryError:
        print(f"{name:28s} out of memory (peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB)")
    except Exception as e:  # one failed measurement must not cost the rest of a GPU lease
        print(f"{name:28s} failed: {type(e).__name__}: {e}"[:300])
    free()


def cpu_runs(arch: str, steps: int) -> None:
    res = 64
    print(f"\n{arch} on CPU ({torch.get_num_threads()} threads): {res} px, batch 1")
    # D on a fresh UNet itself (copy_backbone=False): no student beside it, so that D, its gradients and the
    # backward's buffers stay under 12 GiB at SD1.5 size.
    with torch.device("cpu"):
        disc = UNetDiscriminator(UNetStudent(unet_config=UNETS[arch]).unet, copy_backbone=False)
    b = batch(arch, 1, res, "cpu")
    fake = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for ckpt in (False, True):
        if ckpt:
            disc.enable_gradient_checkpointing()
        # R1 at every timed step: the double backward is where checkpointing's recompute could break.
        times = [
            timed(lambda: d_phase(disc, b, fake, r1=True, device_type="cpu", per_term=True), "cpu")
            for _ in range(steps + 1)
        ][1:]
        disc.zero_grad(set_to_none=True)
        results[ckpt] = statistics.mean(times)
        print(
            "D phase + R1 (fp32, forward, backward per term; no optimiser step), "
            f"d_gradient_checkpointing={str(ckpt).lower():5s}: "
            f"{results[ckpt]:.2f} s"
        )
    disc = None  # freed before the student is built
    free()
    student = UNetStudent(unet_config=UNETS[arch])
    print(f"one-step latency (fp32 student): {latency(student.eval(), arch, res, 'cpu', 3) * 1000:.0f} ms")
    print(f"d_gradient_checkpointing_over_default={results[True] / results[False]:.3f}")
    del student
    free()
    cpu_latency_ratios(arch, repeats=steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sdxl", action="store_true", help="CPU: time SDXL too (about 3x the memory of SD1.5); a GPU always runs both"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per lever (default: 5 on a GPU, 2 on the CPU)")
    args = p.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # the latency runs cast models with .to(dtype) on purpose
    cuda = torch.cuda.is_available()
    archs = ["sd15", "sdxl"] if cuda or args.sdxl else ["sd15"]
    if cuda:
        print(f"device: {torch.cuda.get_device_name()} (CUDA): memory table, full step per lever, one-step latency")
    else:
        print(
            f"device: CPU, no CUDA: reduced run (memory table; timing of {' and '.join(archs)} at 64 px, batch 1, "
            "D phase + R1 and one-step latency only; step time / peak memory per lever need a GPU)"
        )
    for arch in ("sd15", "sdxl"):
        for kind in STUDENT_NAMES:
            memory_table(arch, kind)
    for arch in archs:
        (gpu_runs if cuda else cpu_runs)(arch, args.steps or (5 if cuda else 2))


if __name__ == "__main__":
    main()
