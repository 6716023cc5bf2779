"""The teacher-UNet discriminator (Diffusion2GAN §3.3, :mod:`.unet`) for from-scratch training: there are no
pairs, so no noise condition (z-conditioning); the latent input is blurred early on and DiffAugmented like
the other from-scratch discriminators' inputs."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from distill.losses.diffaugment import DEFAULT_POLICY, DiffAugment

from .inputs import blur
from .unet import UNetDiscriminator


class UnpairedUNetDiscriminator(nn.Module):
    """``forward(latents, prompt_embeds, added_cond_kwargs=None, *, pyramid=None, parts=1, blur_sigma=0,
    mismatched=None) -> logits``: the common interface of the from-scratch discriminators (``pyramid`` and ``parts``
    unused). The text
    enters the backbone here, so ``mismatched`` (other text for the first K samples) runs them through it again."""

    uses_pyramid = False
    needs_reference = False  # see ProjectedDiscriminator

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        timestep: int = 0,
        heads: tuple[str, ...] = ("before", "skip", "after", "final"),
        augment: str = DEFAULT_POLICY,
    ):
        super().__init__()
        self.disc = UNetDiscriminator(unet, timestep=timestep, heads=heads, noise_condition=False)
        self.augment = DiffAugment(augment)

    def forward(
        self,
        x: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond_kwargs: dict | None = None,
        *,
        pyramid: list[torch.Tensor] | None = None,
        parts: int = 1,
        blur_sigma: float = 0.0,
        mismatched: dict | None = None,
    ) -> list[torch.Tensor]:
        x = self.augment(blur(x, blur_sigma))
        if mismatched:
            k = mismatched["prompt_embeds"].shape[0]
            x, prompt_embeds = torch.cat([x, x[:k]]), torch.cat([prompt_embeds, mismatched["prompt_embeds"]])
            other = mismatched.get("added_cond_kwargs")
            if added_cond_kwargs is not None:
                added_cond_kwargs = {key: torch.cat([v, other[key]]) for key, v in added_cond_kwargs.items()}
        return self.disc(x, None, prompt_embeds, added_cond_kwargs)
