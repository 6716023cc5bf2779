"""Exponential moving average of the generator weights (StyleGAN/EDM practice), checkpointable.

Hand-written rather than diffusers' ``EMAModel`` because this one is defined in images seen
(``half_life_kimg``) like EDM, so the EMA horizon does not change with the batch size, and with
StyleGAN2-ADA's ramp-up (the half-life is at most ``rampup`` x images seen so far), so that a short
run's average is not dominated by the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = EMA(model, half_life_kimg=..., rampup=...)``; ``ema.update(model, batch_images, nimg)``; ``ema.model``."""

    def __init__(self, model: nn.Module, *, half_life_kimg: float = 500.0, rampup: float | None = None):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.half_life_kimg = float(half_life_kimg)
        self.rampup = rampup

    def half_life_images(self, nimg: int) -> float:
        """The half-life in images after ``nimg`` images have been seen (ramp-up applied)."""
        half_life = self.half_life_kimg * 1000
        if self.rampup:
            half_life = min(half_life, nimg * self.rampup)
        return half_life

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int, nimg: int | None = None) -> None:
        """``nimg``: images seen including this batch (needed only with ramp-up)."""
        half_life = self.half_life_images(nimg if nimg is not None else batch_images)
        beta = 0.5 ** (batch_images / max(half_life, 1e-8)) if self.half_life_kimg > 0 else 0.0
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
