"""Benchmarks fail fast and loudly: a worker that dies ends the run with its exit code, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import ROOT


def test_latent_lpips_speed_exits_with_the_code_of_a_killed_worker():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "latent_lpips_speed.py"), "--device", "cpu", "--iters", "1",
           "--warmup", "0", "--threads", "1", "--timeout", "300"]
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
