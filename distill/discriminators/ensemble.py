"""Several discriminators judged as one: the logits of each, concatenated (every head then weighs the same in the
loss, :func:`distill.losses.gan.objective_loss`), one optimiser over all of them.

Why: on the digits testbed each from-scratch D learns half of the task in the same budget (docs/from-scratch.md, "From
scratch on the digits: measured"): StyleGAN-T's projected D on a frozen classifier learns the captions but not the
data's spread, GigaGAN's multiscale D trained from scratch with minibatch std learns the spread but not the captions.
Vision-aided GAN training (Kumari et al., CVPR 2022) pairs a frozen-feature D with the ordinary one in the same way.
"""

from __future__ import annotations

import torch
from torch import nn


class DiscriminatorEnsemble(nn.Module):
    """``forward(x, prompt_embeds, added_cond_kwargs=None, **kwargs) -> [logits of D_1..., logits of D_2...]``; the
    keyword arguments (``pyramid``, ``parts``, ``blur_sigma``, ``mismatched``) reach every member. A member that
    reads the generator's pyramid or needs real samples as a reference is refused: the phases pass one of each
    for the whole ensemble."""

    uses_pyramid = False
    needs_reference = False

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        for m in members:
            if getattr(m, "uses_pyramid", False) or getattr(m, "needs_reference", False):
                raise ValueError(
                    f"{type(m).__name__} reads the generator's pyramid or needs a real reference: in an ensemble use "
                    "d_pyramid downsample and d_norm separate"
                )
        self.members = nn.ModuleList(members)

    def forward(
        self, x: torch.Tensor, prompt_embeds: torch.Tensor, added_cond_kwargs: dict | None = None, **kwargs
    ) -> list[torch.Tensor]:
        return [logits for m in self.members for logits in m(x, prompt_embeds, added_cond_kwargs, **kwargs)]
