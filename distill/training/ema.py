"""Exponential moving average of the generator weights (StyleGAN/EDM practice), checkpointable.

Hand-written rather than diffusers' ``EMAModel`` because this one is defined in images seen
(``half_life_kimg``) like EDM, so the EMA horizon does not change with the batch size, and with
StyleGAN2-ADA's ramp-up (the half-life is at most ``rampup`` x images seen so far), so that a short
run's average is not dominated by the initial weights. The copy may live on another device (the CPU) and
in another dtype (bf16) than the model, to save accelerator memory; the update lerps there.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator

import torch
from torch import nn

EMA_DEVICES = ("same", "cpu")  # where the copy lives: the training device, or the host (a memory lever)
EMA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class EMA:
    """``ema = EMA(model, half_life_kimg=..., rampup=...)``; ``ema.update(model, batch_images, nimg)``; ``ema.model``.

    device / dtype: where the copy lives and its floating-point dtype (None: the model's). A bf16 copy rounds away
    updates below ~1/256 of a weight, so with a long half-life it barely moves; the CPU keeps fp32 at no accelerator
    cost.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        half_life_kimg: float = 500.0,
        rampup: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        # Each tensor is copied straight to its target (via deepcopy's memo), never as a full copy on the model's
        # device.
        memo = {id(t): self._placed(t, device, dtype) for t in (*model.parameters(), *model.buffers())}
        self.model = copy.deepcopy(model, memo).requires_grad_(False).eval()
        self.device = torch.device(device) if device is not None else None
        self.half_life_kimg = float(half_life_kimg)
        self.rampup = rampup

    @staticmethod
    def _placed(t: torch.Tensor, device, dtype) -> torch.Tensor:
        copy_ = t.detach().to(
            device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None, copy=True
        )
        return nn.Parameter(copy_, requires_grad=False) if isinstance(t, nn.Parameter) else copy_

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
        # One fused call over all parameters (a Python loop of small lerps was a visible share of a small GAN's step).
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(
            ema_params, [p.detach().to(e.device, e.dtype) for e, p in zip(ema_params, model.parameters())], 1 - beta
        )
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    @contextlib.contextmanager
    def on(self, device: torch.device | str) -> Iterator[nn.Module]:
        """The EMA model moved to ``device`` for the block (validation, export), then back where it lives. On an
        accelerator this fits where training does: the model's gradients, as large, are freed between steps."""
        if self.device is None or self.device == torch.device(device):
            yield self.model
            return
        self.model.to(device)
        try:
            yield self.model
        finally:
            self.model.to(self.device)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def save(self, path: str | os.PathLike) -> None:
        """The averaged weights as safetensors (a checkpoint's ``ema.safetensors``: loading it runs no code)."""
        from safetensors.torch import save_model

        save_model(self.model, str(path))

    def load(self, path: str | os.PathLike) -> None:
        """Weights :meth:`save` wrote, into the copy where it lives (its device and dtype kept)."""
        from safetensors.torch import load_model

        missing, unexpected = load_model(self.model, str(path), strict=False, device=str(self.device or "cpu"))
        if missing or unexpected:
            raise RuntimeError(
                f"{path} does not hold this EMA model's weights (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
