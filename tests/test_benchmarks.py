"""Benchmarks fail fast and loudly: a worker that dies ends the run with its exit code, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import ROOT


def test_latent_lpips_speed_exits_with_the_code_of_a_killed_worker():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "latent_lpips_speed.py"),
        "--device",
        "cpu",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--timeout",
        "300",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the CPU default is announced, then each worker's pid
        lines.append(line)
        if line.startswith("pixel: worker pid "):
            os.kill(int(line.split()[-1]), signal.SIGKILL)  # as the kernel's OOM killer would
            break
    out, err = proc.communicate(timeout=120)  # the parent must not wait forever for the dead worker
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert lines[0].startswith("CPU: using the small setting (128 px, batch 2")
    assert any(line.startswith("E-LatentLPIPS") for line in lines)
    assert err.strip().splitlines()[-1].startswith("error: the pixel worker (pid ") and "killed by signal 9" in err


def test_sd_scale_memory_table_matches_the_published_architectures(capsys):
    """The memory table (meta tensors: no memory, seconds) counts the real SD1.5 / SDXL parameter numbers, and the
    levers save what docs/scale-and-memory.md's "Memory levers" table says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_scale", ROOT / "benchmarks" / "sd_scale.py")
    sd_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_scale)
    for arch in ("sd15", "sdxl"):
        for student in ("unet", "gigagan", "stylegan_t"):
            sd_scale.memory_table(arch, student)
    out = capsys.readouterr().out
    assert "sd15, UNet student: student 0.860 B params" in out and "sdxl, UNet student: student 2.567 B params" in out
    # before #12 (UNet only), default, all levers: the memory tables of docs/scale-and-memory.md
    for head, expected in (
        ("sd15, UNet student", [32.70, 29.26, 14.81]),
        ("sdxl, UNet student", [96.61, 86.34, 43.41]),
        ("sd15, GigaGAN (paper)", [31.21, 15.67]),
        ("sdxl, GigaGAN (paper)", [60.82, 33.79]),
        ("sd15, StyleGAN-T (paper)", [31.50, 15.81]),
        ("sdxl, StyleGAN-T (paper)", [62.41, 34.39]),
    ):
        table = out.split(f"{head}: ")[1].split("\n\n")[0].splitlines()
        assert [float(line.split()[-1]) for line in table if line.startswith(("before", "default", "all"))] == expected
