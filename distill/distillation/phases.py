"""The loss phases of one stage-two step (Diffusion2GAN §3): G, then D with lazy R1.

G:    lpips_weight * E-LatentLPIPS(G(z, c), x) + gan_weight * softplus(-D(G(z~, c) | z~, c))
D:    softplus(-D(x | z, c)) + softplus(D(G(z~, c) | z~, c))  [d_gan]  + softplus(D(x | z', c'))  [d_mix:
      mix-and-match; z' always another sample's noise, c' independently the own or another prompt]
z~ is the pair's noise z (the paper) or, with fresh GAN noise, a new unit-Gaussian sample: on a small
pair set a from-scratch generator fits the training pairs almost exactly, so fakes made from their
noise are nearly the targets and D learns nothing; on fresh noise D sees what G does off the pairs.
Dreg: every r1_interval steps, r1_interval * r1_gamma / 2 * ||grad_x D(x | z, c)||^2 on one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.losses.gan import discriminator_loss, generator_loss, mismatch_loss, mix_and_match, r1_penalty
from students.text import TextConditioning

REGRESSIONS = ("elatentlpips", "mse", "none")


@dataclass
class Batch:
    noise: torch.Tensor  # [N,C,H,W]
    target: torch.Tensor  # [N,C,H,W] teacher latents
    cond: TextConditioning
    gan_noise: torch.Tensor | None = None  # [N,C,H,W] fresh noise for the GAN fakes (None: the pairs' noise)

    @property
    def fake_noise(self) -> torch.Tensor:
        """The noise the GAN's fakes are made from and conditioned on."""
        return self.noise if self.gan_noise is None else self.gan_noise


def _d_inputs(batch_noise, cond: TextConditioning) -> dict:
    return {"noise": batch_noise, "prompt_embeds": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs()}


def generator_terms(
    *,
    student,
    discriminator,
    lpips_loss,
    batch: Batch,
    regression: str,
    lpips_weight: float,
    gan_weight: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GAN's fake ``[N,C,H,W]`` (from ``batch.fake_noise``, for the D phase) and the weighted G loss
    terms (their sum is the G loss).

    ``discriminator`` is used frozen here (the caller turns its gradients off) and may be None.
    """
    fake = student(batch.noise, batch.cond.prompt_embeds, added_cond_kwargs=batch.cond.added_cond_kwargs())
    terms: dict[str, torch.Tensor] = {}
    if regression == "elatentlpips" and lpips_weight:
        terms["g_lpips"] = lpips_weight * lpips_loss(fake, batch.target, generator=generator).mean()
    elif regression == "mse" and lpips_weight:
        terms["g_mse"] = lpips_weight * F.mse_loss(fake.float(), batch.target.float())
    if batch.gan_noise is not None:
        fake = student(batch.gan_noise, batch.cond.prompt_embeds, added_cond_kwargs=batch.cond.added_cond_kwargs())
    if gan_weight and discriminator is not None:
        terms["g_gan"] = gan_weight * generator_loss(discriminator(fake, **_d_inputs(batch.fake_noise, batch.cond)))
    return fake, terms


def discriminator_terms(
    *,
    discriminator,
    discriminator_unwrapped,
    batch: Batch,
    fake: torch.Tensor,
    mix_fraction: float,
    r1_gamma: float,
    r1_interval: int,
    do_r1: bool,
    generator: torch.Generator,
    stats: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted D loss terms. Real and fake go through one forward (one DDP reduction per step);
    R1 uses the unwrapped module because DDP does not support double backward. ``stats``, when given,
    receives the mean real and fake logits over heads (``d_real_logit``, ``d_fake_logit``; not losses)."""
    n = batch.target.shape[0]
    fake = fake.detach()
    k = int(round(mix_fraction * n)) if n >= 2 else 0
    latents = [batch.target, fake]
    noise = [batch.noise, batch.fake_noise]
    conds = [batch.cond, batch.cond]
    if k:
        noise_index, prompt_index = mix_and_match(n, k, generator=generator)
        latents.append(batch.target[:k])
        noise.append(batch.noise[noise_index])
        conds.append(batch.cond.index(prompt_index))
    cond = TextConditioning(
        torch.cat([c.prompt_embeds for c in conds]),
        None if batch.cond.pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in conds]),
        None if batch.cond.time_ids is None else torch.cat([c.time_ids for c in conds]),
    )
    logits = discriminator(torch.cat(latents), **_d_inputs(torch.cat(noise), cond))
    terms = {"d_gan": discriminator_loss([l[:n] for l in logits], [l[n:2 * n] for l in logits])}
    if stats is not None:
        stats["d_real_logit"] = torch.stack([l[:n].detach().float().mean() for l in logits]).mean()
        stats["d_fake_logit"] = torch.stack([l[n:2 * n].detach().float().mean() for l in logits]).mean()
    if k:
        terms["d_mix"] = mismatch_loss([l[2 * n:] for l in logits])
    if do_r1 and r1_gamma > 0:
        one = batch.cond.index(slice(0, 1))
        penalty = r1_penalty(discriminator_unwrapped, batch.target[:1], **_d_inputs(batch.noise[:1], one))
        terms["d_r1"] = (r1_gamma / 2) * r1_interval * penalty
    return terms
