"""The optimiser loop shared by the two digits-teacher trainers (``distill/digits/train_teacher.py``, UNet /
DDPM; ``distill/digits/train_teacher_sd3.py``, MMDiT / flow matching): linear learning-rate warm-up, gradient
clipping, an EMA of the trained parameters with the ``(1 + step) / (10 + step)`` ramp, a checkpoint every N
steps and a wall-clock budget. The scripts own the data, the loss and what a checkpoint writes.

    steps = TeacherSteps(optimizer=opt, params=params, base_lrs=lrs, warmup_steps=200, ema_decay=0.998,
                         start=start, total=4000, checkpoint_every=500, max_minutes=0, checkpoint=save, desc="unet")
    for step in steps:
        steps.update(loss_of(step))
    save(steps.done, final=True)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm


def prepare_run(*, output_dir: str, seed: int, num_threads: int) -> tuple[Path, torch.Generator]:
    """Threads, the output folder and the seeds of a digits-teacher run: ``(output folder, data generator)``."""
    torch.set_num_threads(num_threads)
    torch.set_flush_denormal(True)  # denormals in late-training weights slow CPU kernels a lot
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return out, torch.Generator().manual_seed(seed)


def with_weights(module: torch.nn.Module, weights: list[torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module`` whose parameters (in ``parameters()`` order) are ``weights`` (e.g. the EMA)."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p, w in zip(out.parameters(), weights):
            p.copy_(w)
    return out


class TeacherSteps:
    """Iterate to get the step numbers from ``start`` to ``total``; call :meth:`update` with each step's loss.
    ``ema`` (a list of tensors, one per parameter) may be passed in when resuming; ``done`` is the number of
    steps completed when the loop ends (early at ``max_minutes``, a final checkpoint is then the caller's)."""

    def __init__(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        base_lrs: list[float],
        warmup_steps: int,
        ema_decay: float,
        start: int,
        total: int,
        checkpoint_every: int,
        max_minutes: float,
        checkpoint: Callable[[int], None],
        desc: str,
        ema: list[torch.Tensor] | None = None,
        max_grad_norm: float = 1.0,
    ):
        self.optimizer, self.params, self.base_lrs = optimizer, params, base_lrs
        self.warmup_steps, self.ema_decay, self.max_grad_norm = warmup_steps, ema_decay, max_grad_norm
        self.start, self.total, self.done = start, total, start
        self.checkpoint_every, self.max_minutes, self.checkpoint, self.desc = (
            checkpoint_every,
            max_minutes,
            checkpoint,
            desc,
        )
        self.ema = ema if ema is not None else [p.detach().clone() for p in params]
        self.t0 = time.time()
        self._step = start

    def minutes(self) -> float:
        return (time.time() - self.t0) / 60

    def __iter__(self) -> Iterator[int]:
        bar = tqdm(range(self.start, self.total), desc=self.desc, mininterval=10, initial=self.start, total=self.total)
        self._bar = bar
        for step in bar:
            self._step = step
            yield step
            self.done = step + 1
            out_of_time = self.max_minutes > 0 and self.minutes() >= self.max_minutes
            if (
                self.checkpoint_every > 0
                and self.done % self.checkpoint_every == 0
                and self.done < self.total
                and not out_of_time
            ):
                self.checkpoint(self.done)
            if out_of_time:
                tqdm.write(f"max_minutes={self.max_minutes} reached at step {self.done}")
                return

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss`` (warm-up, clipping), then the EMA."""
        warm = min(1.0, (self._step + 1) / max(self.warmup_steps, 1))
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * warm
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        decay = min(
            self.ema_decay, (1 + self._step) / (10 + self._step)
        )  # short memory early: the first weights are noise
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1.0 - decay)
        self._bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
