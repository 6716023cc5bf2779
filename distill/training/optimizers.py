"""The optimisers of stage two's generator and discriminator: Adam, or bitsandbytes' 8-bit Adam (a memory lever)."""

from __future__ import annotations

import importlib

import torch

OPTIMIZERS = ("adam", "adam8bit")


def require_optimizer(name: str) -> None:
    """Fail early (before the teacher loads) when ``name``'s package is missing."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "adam8bit":
        try:
            importlib.import_module("bitsandbytes")
        except ImportError:
            raise ValueError(
                "optimizer adam8bit needs bitsandbytes: pip install bitsandbytes (or set optimizer: adam)"
            ) from None


def build_optimizer(name: str, params, *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Adam, or bitsandbytes' 8-bit Adam: block-wise quantised moments, 2 bytes of state per parameter instead of 8."""
    require_optimizer(name)
    if name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=lr, betas=betas)
    return torch.optim.Adam(params, lr=lr, betas=betas)
