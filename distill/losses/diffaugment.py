"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020).

Every image a discriminator sees, real or generated, in its update and in the generator's, goes
through the same random differentiable augmentation, so D cannot overfit the few real images and the
generator's gradient passes through the augmentation to it (StyleGAN-T §3.2 keeps it always on with
the default policy: colour, translation, cutout). The ops are :class:`~distill.losses.augment.SharedAugment`'s
kornia families, drawn independently per sample.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.losses.augment import SharedAugment

DEFAULT_POLICY = "color,translation,cutout"


class DiffAugment(nn.Module):
    """``forward(x [N,C,H,W], generator=None) -> [N,C,H,W]``: one random augmentation per sample.

    ``generator`` makes the draw a pure function of its state (the global RNG is neither read nor
    advanced); without one the global RNG is used. ``policy`` ``""`` / ``none`` is the identity.
    """

    def __init__(self, policy: str = DEFAULT_POLICY):
        super().__init__()
        self.ops = SharedAugment(policy)

    @property
    def policy(self) -> tuple[str, ...]:
        return self.ops.families

    def extra_repr(self) -> str:
        return f"policy={self.policy}"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.ops.families:
            return x
        return self.ops.apply(x, self.ops.sample(x.shape, generator))
