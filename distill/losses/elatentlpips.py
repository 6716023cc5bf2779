"""E-LatentLPIPS: LPIPS computed on VAE latents, with a shared random augmentation per call.

Diffusion2GAN (Kang et al., ECCV 2024), Sec. 3.2 and App.: a VGG16-BN trunk whose first conv takes
the latent channels and whose first three max-pools are removed (latents are 8x smaller than pixels),
trained as a classifier on VAE latents; LPIPS-style 1x1 linear heads calibrated on BAPPS 2AFC. The
distance is the LPIPS formula on latents::

    d(x, y) = sum_s mean_hw( w_s . (n(f_s(x)) - n(f_s(y)))^2 )      n = unit-norm over channels

**Latent convention (the one place where scaling happens).** Inputs are *diffusers-scaled* latents,
i.e. what a pipeline returns with ``output_type="latent"`` and what the UNet is trained on:
``(vae.encode(img).latent_dist.sample() - shift_factor) * scaling_factor``. The published networks were
trained on exactly these, so by default nothing is rescaled. Pass ``raw_latents=True`` to
:class:`ELatentLPIPS` for unscaled VAE-encoder outputs; :meth:`ELatentLPIPS.prepare_latents` then applies
the network's recorded ``(x - shift_factor) * scaling_factor`` -- and nothing else scales inputs.
FLUX pipelines return packed ``[N, seq, 64]`` latents: unpack them to ``[N, 16, H, W]`` first.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

# The published weights live in their own module; these names stay importable from here.
from .elatentlpips_weights import (  # noqa: F401
    PUBLISHED,
    PUBLISHED_LICENSE,
    PUBLISHED_REPO,
    FetchOptions,
    PublishedNet,
    convert_reference_state_dict,
    fetch_published,
    load_latent_lpips,
    load_reference_checkpoint,
    published_filename,
)
from .latent_lpips_net import LatentLPIPSNet  # noqa: F401  (the network, importable from here too)

if TYPE_CHECKING:
    from .augment import SharedAugment


class ELatentLPIPS(nn.Module):
    """E-LatentLPIPS loss: ``loss(pred_latents, target_latents, generator=None) -> [N]`` distances.

    ``augment``: a policy string (see :mod:`distill.losses.augment`, e.g. ``"bg"`` as in the reference,
    ``"geo,cutout"`` as in the paper), a :class:`SharedAugment`, or ``None`` for plain LatentLPIPS.
    ``l1_weight``: adds ``l1_weight * mean|pred - target|`` on the un-augmented latents (the reference
    adds it with weight 1 by default). The network is frozen and always in eval mode (BN statistics
    must not move when the generator trains). Deterministic evaluation: ``augment=None``, or pass a
    ``torch.Generator`` (same generator state + same inputs -> same value; the global RNG is untouched).
    """

    def __init__(
        self,
        net: LatentLPIPSNet,
        *,
        augment: str | SharedAugment | None = "bg",
        l1_weight: float = 1.0,
        raw_latents: bool = False,
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        if isinstance(augment, str):
            from .augment import SharedAugment  # kornia is imported only when augmentation is used

            augment = SharedAugment(augment)
        self.augment = augment
        self.l1_weight = float(l1_weight)
        self.raw_latents = raw_latents

    def train(self, mode: bool = True):  # the frozen metric net stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def prepare_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The only input scaling: raw VAE outputs -> diffusers-scaled latents (no-op by default)."""
        if not self.raw_latents:
            return x
        cfg = self.net.config
        return (x - cfg.shift_factor) * cfg.scaling_factor

    def forward(
        self, pred_latents: torch.Tensor, target_latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if pred_latents.shape != target_latents.shape:
            raise ValueError(
                f"pred {tuple(pred_latents.shape)} and target {tuple(target_latents.shape)} differ in shape"
            )
        expected = self.net.config.latent_channels
        if pred_latents.ndim != 4 or pred_latents.shape[1] != expected:
            raise ValueError(
                f"expected [N, {expected}, H, W] latents for this network, got {tuple(pred_latents.shape)}"
                + (" (FLUX latents must be unpacked first)" if pred_latents.ndim == 3 else "")
            )
        # Augment and L1 in float32 (kornia's warps, small tensors); the trunk runs in its own dtype.
        x = self.prepare_latents(pred_latents).float()
        y = self.prepare_latents(target_latents).float()
        dist = 0.0
        if self.l1_weight:
            dist = self.l1_weight * (x - y).abs().mean(dim=(1, 2, 3))
        if self.augment is not None:
            x, y = self.augment(x, y, generator=generator)
        dtype = next(self.net.parameters()).dtype
        return self.net(x.to(dtype), y.to(dtype)).float() + dist

    def ensemble(
        self, pred_latents: torch.Tensor, target_latents: torch.Tensor, *, draws: int = 8, seed: int = 0
    ) -> torch.Tensor:
        """Mean distance over ``draws`` augmentations from a generator seeded with ``seed``.

        A deterministic, lower-variance evaluation metric: same inputs and seed -> same value.
        """
        g = torch.Generator().manual_seed(seed)
        return torch.stack([self(pred_latents, target_latents, generator=g) for _ in range(draws)]).mean(dim=0)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        augment: str | SharedAugment | None = "bg",
        l1_weight: float = 1.0,
        raw_latents: bool = False,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        is_main_process: Callable[[], bool] | None = None,
        barrier: Callable[[], None] | None = None,
    ) -> "ELatentLPIPS":
        """:func:`load_latent_lpips` + the loss wrapper; the last four options are :class:`FetchOptions`'s."""
        fetch = FetchOptions(download=download, cache_dir=cache_dir, is_main_process=is_main_process, barrier=barrier)
        net = load_latent_lpips(name_or_path, fetch=fetch)
        return cls(net, augment=augment, l1_weight=l1_weight, raw_latents=raw_latents)
