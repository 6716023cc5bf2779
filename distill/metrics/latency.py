"""Latency and throughput of a generation call on the device at hand (warm-up excluded), and peak memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass
class LatencyResult:
    seconds_per_image: float
    images_per_second: float
    seconds_per_batch: float
    batch_size: int
    iterations: int
    warmup: int
    peak_memory_mb: float
    memory_kind: str  # "cuda_max_allocated" (since the timed calls began) or "cpu_max_rss" (process lifetime)
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    generate: Callable[[], Any],
    *,
    batch_size: int,
    warmup: int = 2,
    iterations: int = 10,
    min_seconds: float = 0.0,
    device: str | torch.device = "cpu",
) -> LatencyResult:
    """Time ``generate()`` (one call makes ``batch_size`` images): ``warmup`` untimed calls, then at least
    ``iterations`` timed ones and more until ``min_seconds`` of timed calls have passed; the median call.

    A fast generator (a one-step student) is timed over many calls and a slow one (a 25-step teacher)
    over few, and the median ignores a call slowed by another process, so the ratio of two
    measurements is not at the mercy of one noisy call. The device is synchronised around every timed
    call so asynchronous CUDA work is counted.
    """
    if batch_size <= 0 or iterations <= 0 or warmup < 0 or min_seconds < 0:
        raise ValueError("batch_size and iterations must be positive, warmup and min_seconds non-negative")
    device = torch.device(device)
    for _ in range(warmup):  # cudnn autotuning, lazy allocations, first-call compilation
        generate()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    while len(times) < iterations or sum(times) < min_seconds:
        _sync(device)
        start = time.perf_counter()
        generate()
        _sync(device)
        times.append(time.perf_counter() - start)
    per_batch = float(torch.tensor(times, dtype=torch.float64).median())
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak, kind = rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"
    return LatencyResult(
        seconds_per_image=per_batch / batch_size,
        images_per_second=batch_size / per_batch,
        seconds_per_batch=per_batch,
        batch_size=batch_size,
        iterations=len(times),
        warmup=warmup,
        peak_memory_mb=peak,
        memory_kind=kind,
        device=str(device),
    )
