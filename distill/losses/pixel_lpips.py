"""Pixel LPIPS on decoded latents: the baseline E-LatentLPIPS replaces (Diffusion2GAN Sec. 3.2, Table 1).

Decodes both latents with the teacher's diffusers VAE, then applies ``lpips`` (Zhang et al. 2018).
Latents follow the same convention as :mod:`distill.losses.elatentlpips`: diffusers-scaled, so the
decoder input is ``x / scaling_factor + shift_factor`` (what the pipelines do before ``vae.decode``).
"""

from __future__ import annotations

import torch
from torch import nn


def build_pixel_lpips(*, net: str = "vgg", pretrained_trunk: bool = True) -> nn.Module:
    """``lpips.LPIPS`` with its calibrated heads; the ImageNet trunk comes from torchvision's cache.

    ``pretrained_trunk=False`` uses a random trunk (benchmarks/tests only: no download needed).
    """
    import lpips

    try:
        model = lpips.LPIPS(net=net, pnet_rand=not pretrained_trunk, verbose=False)
    except Exception as exc:  # torchvision weight download failed (offline, proxy, ...)
        raise OSError(
            f"could not load the pretrained {net} trunk for pixel LPIPS ({exc}); put torchvision's weights in "
            "$TORCH_HOME/hub/checkpoints (e.g. vgg16-397923af.pth) or use pretrained_trunk=False for timing only"
        ) from exc
    return model.eval().requires_grad_(False)


class PixelLPIPS(nn.Module):
    """``loss(pred_latents, target_latents) -> [N]``: decode with ``vae``, then pixel LPIPS.

    The VAE and LPIPS nets are frozen; gradients flow through the decoder to ``pred_latents``. The
    target is decoded without a graph. ``l1_weight`` adds an L1 term on the latents, like
    :class:`~distill.losses.elatentlpips.ELatentLPIPS`, so the two are interchangeable as losses.
    """

    def __init__(self, vae: nn.Module, *, lpips_net: nn.Module | None = None, l1_weight: float = 0.0):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.lpips = (lpips_net if lpips_net is not None else build_pixel_lpips()).eval().requires_grad_(False)
        self.l1_weight = float(l1_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        self.lpips.eval()
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from students.latents import unscale_latents  # students/ is imported only when this loss runs

        z = unscale_latents(latents.to(self.vae.dtype), self.vae.config)
        # No clamp to [-1, 1]: it would zero the gradient wherever the generator overshoots.
        return self.vae.decode(z).sample.float()

    def forward(self, pred_latents: torch.Tensor, target_latents: torch.Tensor, generator=None) -> torch.Tensor:
        del generator  # no randomness; accepted so both losses share one call signature
        with torch.no_grad():
            target = self.decode(target_latents)
        pred = self.decode(pred_latents)
        dist = self.lpips(pred, target).flatten()  # images in [-1, 1], lpips's expected range
        if self.l1_weight:
            dist = dist + self.l1_weight * (pred_latents - target_latents).abs().float().mean(dim=(1, 2, 3))
        return dist
