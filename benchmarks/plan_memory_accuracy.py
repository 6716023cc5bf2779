"""The memory planner (distill/plan_memory.py) against the peaks measured on an H200 (docs/scale-and-memory.md, by
benchmarks/sd_scale.py): planned vs measured for every measured row, on the CPU, no GPU needed.

The planned number is what the benchmark measured: ``torch.cuda.max_memory_allocated`` over its first step (with R1,
the optimisers' states created by it) and steps without R1, its step (MSE regression, no E-LatentLPIPS) and its
tensors (no text encoders or VAE on the device: their bytes are taken off the plan). Beside it the run's peak the
planner reports for the same config with the trainer's frozen models: a later step with R1, every state present.

    python benchmarks/plan_memory_accuracy.py            # all rows (about 25 min on a 2-core CPU)
    python benchmarks/plan_memory_accuracy.py --sd15     # the SD1.5 rows only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.core.config import parse_config  # noqa: E402
from distill.distillation import memory_plan as mp  # noqa: E402
from distill.distillation.students import apply_teacher_defaults  # noqa: E402
from distill.plan_memory import PlanConfig, check  # noqa: E402

BENCHMARK = [
    "--mixed_precision",
    "bf16",
    "--regression",
    "mse",
    "--lpips_weight",
    "1",
    "--gan_weight",
    "0.1",
    "--mix_fraction",
    "0.25",
    "--r1_gamma",
    "1e-5",
    "--r1_interval",
    "16",
    "--student_size",
    "paper",
]
GPU_RUNS = {"sd15": ["--batch_size", "16"], "sdxl": ["--batch_size", "4"]}  # 512 px / 1024 px: the native resolutions
ALL_BUT_8BIT = ["--gradient_checkpointing", "--d_gradient_checkpointing", "--ema_device", "cpu"]
# (architecture, row, overrides, measured peak GB on the H200; None: out of memory, above 143 GB)
ROWS = [
    ("sd15", "default", [], 95.3),
    ("sd15", "d_gradient_checkpointing", ["--d_gradient_checkpointing"], 95.2),
    ("sd15", "gradient_checkpointing (student)", ["--gradient_checkpointing"], 83.6),
    ("sd15", "ema_device cpu", ["--ema_device", "cpu"], 91.7),
    ("sd15", "ema_dtype bf16", ["--ema_dtype", "bf16"], 93.4),
    ("sd15", "all of the above but 8-bit Adam", ALL_BUT_8BIT, 79.8),
    ("sd15", "GigaGAN student (paper)", ["--student", "gigagan"], 92.4),
    ("sd15", "StyleGAN-T student (paper)", ["--student", "stylegan_t"], 85.7),
    ("sdxl", "d_gradient_checkpointing", ["--d_gradient_checkpointing"], 133.2),
    ("sdxl", "all of the above but 8-bit Adam", ALL_BUT_8BIT, 122.4),
    ("sdxl", "default", [], None),
    ("sdxl", "gradient_checkpointing (student)", ["--gradient_checkpointing"], None),
    ("sdxl", "ema_device cpu", ["--ema_device", "cpu"], None),
    ("sdxl", "ema_dtype bf16", ["--ema_dtype", "bf16"], None),
    ("sdxl", "GigaGAN student (paper)", ["--student", "gigagan"], None),
    ("sdxl", "StyleGAN-T student (paper)", ["--student", "stylegan_t"], None),
]
OUT_OF_MEMORY = 143.0  # the H200's memory in GB: "out of memory" rows measured above it


def config(arch: str, overrides: list[str]) -> PlanConfig:
    cfg = parse_config(PlanConfig, ["--architecture", arch, *BENCHMARK, *GPU_RUNS[arch], *overrides])
    check(cfg)
    apply_teacher_defaults(cfg, family=mp.FAMILY[arch])
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="the SD1.5 rows only")
    p.add_argument("--measured_only", action="store_true", help="skip the rows measured as out of memory")
    args = p.parse_args()
    traces: dict = {}
    errors = []
    print(f"{'row':44s} {'measured':>9s} {'planned':>8s} {'error':>7s} {'run peak':>9s} {'trace s':>8s}")
    for arch, name, overrides, measured in ROWS:
        if (args.sd15 and arch != "sd15") or (args.measured_only and measured is None):
            continue
        cfg = config(arch, overrides)
        trace_levers, size_levers = mp.levers_of(cfg)
        key = (arch, cfg.student, trace_levers)
        if key not in traces:
            traces[key] = mp.trace(
                cfg, teacher=arch, architecture=arch, resolution=mp.NATIVE_RESOLUTION[arch], levers=trace_levers
            )
        t = traces[key]
        frozen = t.sizes["frozen_fp32"]  # the benchmark held no text encoder or VAE on the device
        planned = (t.measured_peak(size_levers).total - frozen) / 1e9
        run = t.peak(size_levers).total / 1e9
        if measured is not None:
            error = 100 * (planned / measured - 1)
            errors.append(abs(error))
            verdict = f"{error:+6.1f}%"
        else:
            verdict = "  fits!" if planned <= OUT_OF_MEMORY else "  OOM ok"
        shown = f"{measured:9.1f}" if measured is not None else f"{'> 143':>9s}"
        print(f"{arch + ' ' + name:44s} {shown} {planned:8.1f} {verdict:>7s} {run:9.1f} {t.seconds:8.0f}", flush=True)
    print(f"max_abs_error_pct={max(errors):.1f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
