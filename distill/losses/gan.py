"""GAN objectives over multi-scale heads (``OBJECTIVES``): the non-saturating loss of Diffusion2GAN §3.3 and GigaGAN,
the hinge loss of StyleGAN-T §3.2 (Lim & Ye 2017); R1 (the paper's lazy single-sample R1 and the from-scratch Ds'
per-batch one); the mismatched conditions of mix-and-match (real pairs with a wrong condition count as fake) and of
the matching-aware term. The phases that use them: :mod:`distill.training.gan_step`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class Objective:
    """A GAN loss as three per-element functions of the logits, averaged over every head's logits by
    :func:`objective_loss`: D's loss on real logits, D's loss on generated (or mismatched) ones, G's loss."""

    real: Callable[[torch.Tensor], torch.Tensor]
    fake: Callable[[torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]


OBJECTIVES = {
    "non_saturating": Objective(real=lambda x: F.softplus(-x), fake=F.softplus, generator=lambda x: F.softplus(-x)),
    # Hinge (StyleGAN-T §3.2, evaluated per token of every head): D relu(1 - real) + relu(1 + fake), G -fake.
    "hinge": Objective(real=lambda x: F.relu(1 - x), fake=lambda x: F.relu(1 + x), generator=lambda x: -x),
}


def objective_loss(logits: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (one of an :class:`Objective`'s functions) averaged over every head's patch logits: one number per head,
    then the mean over heads."""
    return torch.stack([fn(x.float()).mean() for x in logits]).mean()


def mismatched_condition(n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation with no fixed point (a random cyclic shift): every sample gets another's condition."""
    if n < 2:
        raise ValueError("mix-and-match needs a batch of at least 2")
    shift = int(torch.randint(1, n, (1,), generator=generator))
    return (torch.arange(n) + shift) % n


def mix_and_match(n: int, k: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditions under which the first ``k`` real latents of a batch of ``n`` are shown as fake (§3.3):
    ``(noise_index [k], prompt_index [k])``, drawn independently. The noise always comes from another
    sample, so every such pair is truly mismatched even where prompts repeat; the prompt is the sample's
    own for about half of them (a noise-only mismatch: D has to check the latent against its noise,
    the point of conditioning D on z) and another sample's for the rest."""
    noise_index = mismatched_condition(n, generator=generator)[:k]
    other_prompt = mismatched_condition(n, generator=generator)[:k]
    own_prompt = torch.rand(k, generator=generator) < 0.5
    return noise_index, torch.where(own_prompt, torch.arange(k), other_prompt)


def _float32(value):
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def r1_penalty(discriminator, real_latents: torch.Tensor, **cond) -> torch.Tensor:
    """Single-sample R1 (the paper regularises one sample of the batch): ||grad_x sum D(x)||^2.

    ``real_latents`` [1,C,H,W] (or a batch: the mean over it); ``cond`` are the discriminator's other inputs. Computed
    in fp32 with autocast off: the inner ``autograd.grad`` gets no loss scaling, so fp16 input gradients
    of a D with small outputs underflow (the tiny D with 1e-3 head outputs: 3-5x off), bf16 ones are coarse.
    """
    x = real_latents.detach().float().requires_grad_(True)
    # Fused attention kernels (flash / memory-efficient) have no double backward; the math one does.
    with torch.autocast(x.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        logits = discriminator(x, **_float32(cond))
        score = sum(l.float().flatten(1).mean(dim=1).sum() for l in logits) / len(logits)
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
    return grad.pow(2).sum(dim=(1, 2, 3)).mean()
