"""Shared differentiable augmentation for E-LatentLPIPS (Diffusion2GAN, Kang et al. 2024, Sec. 3.2).

The "E" (ensemble) in E-LatentLPIPS: every evaluation draws one random augmentation and applies the
*same* transform to both inputs before the latent network. The families follow StyleGAN2-ADA's
pipeline that the paper uses (blit / geometric / color / cutout); the warps are kornia's
differentiable augmentations, sampled once and re-applied to the second input via ``params=``.

Policy strings: comma-separated family names (``"geo,cutout"``) or ADA-style letters (``"bg"``,
``"bgco"``), or a mix (``"bg,cutout"``)::

    b / blit     x-flip, 90-degree rotations, integer translation (exact: nearest sampling, rounded shifts)
    g / geo      one affine warp: rotation, isotropic + anisotropic scale, fractional translation
    c / color    brightness, contrast, saturation (on latent channels; plain tensor ops)
    t / translation  integer translation up to 1/8 of the side, zero-padded (DiffAugment's, Zhao et al. 2020)
    o / cutout   a zeroed square, half the side length
"""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

FAMILIES = ("blit", "geo", "color", "translation", "cutout")
_LETTERS = {"b": "blit", "g": "geo", "c": "color", "t": "translation", "o": "cutout"}


def parse_policy(policy: str | None) -> tuple[str, ...]:
    """``"bg"`` / ``"geo,cutout"`` / ``"bg,cutout"`` -> ordered tuple of family names (ADA order)."""
    if policy is None or policy.strip().lower() in ("", "none", "off"):
        return ()
    chosen: set[str] = set()
    for token in policy.lower().replace(" ", "").split(","):
        if not token:
            continue
        if token in FAMILIES:
            chosen.add(token)
        elif all(ch in _LETTERS for ch in token):
            chosen.update(_LETTERS[ch] for ch in token)
        else:
            raise ValueError(
                f"unknown augmentation policy token {token!r} in {policy!r}: use names {', '.join(FAMILIES)} "
                f"or letters {''.join(_LETTERS)} (e.g. 'bg', 'geo,cutout')"
            )
    # ADA applies geometry before colour before cutout (DiffAugment: colour, translation, cutout); keep that
    # order whatever the string order.
    return tuple(f for f in FAMILIES if f in chosen)


class _KorniaOp:
    """A kornia augmentation whose sampled parameters are shared by both inputs."""

    def __init__(self, op: nn.Module, round_keys: tuple[str, ...] = ()):
        self.op = op
        self.round_keys = round_keys  # integer translation: kornia samples pixels as floats

    def sample(self, shape: torch.Size) -> dict[str, Any]:
        params = self.op.forward_parameters(shape)
        for key in self.round_keys:
            params[key] = params[key].round()
        return params

    def apply(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return self.op(x, params=params)


class _ColorOp:
    """Brightness / contrast / saturation on C latent channels.

    kornia's colour ops assume RGB in [0, 1] (clamping, HSV), which is wrong for latents, so these are
    three affine tensor ops with ADA-like ranges; the mean is each input's own (as in the reference).
    """

    def sample(self, shape: torch.Size) -> dict[str, Any]:
        n = shape[0]
        return {
            "brightness": torch.rand(n) - 0.5,
            "contrast": torch.rand(n) + 0.5,
            "saturation": torch.rand(n) * 2.0,
        }

    def apply(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        b, c, s = (
            params[k].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            for k in ("brightness", "contrast", "saturation")
        )
        x = x + b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        if x.shape[1] > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * s + mean
        return x


class SharedAugment(nn.Module):
    """Draw one random augmentation per sample and apply it identically to two latent batches.

    ``forward(a, b, generator=None)``: with a ``torch.Generator`` the draw is a pure function of the
    generator's state (the global RNG is neither used nor advanced), which gives a reproducible,
    deterministic evaluation mode. Without one, the global RNG is used, as in training.
    """

    def __init__(
        self,
        policy: str = "bg",
        *,
        xint_max: float = 0.125,
        rotate_max_deg: float = 180.0,
        scale_range: tuple[float, float] = (0.76, 1.32),  # ~ADA's 2^(+-2*0.2)
        xfrac_max: float = 0.125,
        cutout_size: float = 0.5,
    ):
        super().__init__()
        self.policy = policy
        self.families = parse_policy(policy)
        ops: list[Any] = []
        if "blit" in self.families:
            ops.append(_KorniaOp(K.RandomHorizontalFlip(p=0.5)))
            # nearest + align_corners: a quarter turn of a square grid is an exact permutation.
            ops.append(_KorniaOp(K.RandomRotation90(times=(0, 3), resample="nearest", align_corners=True, p=1.0)))
            ops.append(
                _KorniaOp(
                    K.RandomTranslate(
                        translate_x=(-xint_max, xint_max),
                        translate_y=(-xint_max, xint_max),
                        resample="nearest",
                        padding_mode="reflection",
                        p=1.0,
                    ),
                    round_keys=("translate_x", "translate_y"),
                )
            )
        if "geo" in self.families:
            # One affine warp for all geometric parts: composing them in one matrix resamples once
            # (ADA does the same); four separate warps would blur the small latent grid four times.
            lo, hi = scale_range
            ops.append(
                _KorniaOp(
                    K.RandomAffine(
                        degrees=rotate_max_deg,
                        translate=(xfrac_max, xfrac_max),
                        scale=(lo, hi, lo, hi),  # independent x/y scale: isotropic and anisotropic
                        padding_mode="reflection",
                        p=1.0,
                    )
                )
            )
        if "color" in self.families:
            ops.append(_ColorOp())
        if "translation" in self.families:
            # DiffAugment's translation: whole pixels, the uncovered border zero (not reflected as in blit).
            ops.append(
                _KorniaOp(
                    K.RandomTranslate(
                        translate_x=(-xint_max, xint_max),
                        translate_y=(-xint_max, xint_max),
                        resample="nearest",
                        padding_mode="zeros",
                        p=1.0,
                    ),
                    round_keys=("translate_x", "translate_y"),
                )
            )
        if "cutout" in self.families:
            area = cutout_size**2
            ops.append(_KorniaOp(K.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.0, p=1.0)))
        self._ops = ops

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, families={self.families}"

    def sample(self, shape: torch.Size, generator: torch.Generator | None = None) -> list[dict[str, Any]]:
        """Sample the parameters of every op for a batch of ``shape`` (done on the CPU)."""
        if generator is None:
            return [op.sample(shape) for op in self._ops]
        # kornia samples from the global CPU RNG; run it on a private copy seeded from the generator.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [op.sample(shape) for op in self._ops]

    def apply(self, x: torch.Tensor, params: list[dict[str, Any]]) -> torch.Tensor:
        for op, p in zip(self._ops, params):
            x = op.apply(x, p)
        return x

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if a.shape != b.shape or a.ndim != 4:
            raise ValueError(
                f"expected two [N, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not self._ops:
            return a, b
        params = self.sample(a.shape, generator)
        return self.apply(a, params), self.apply(b, params)
