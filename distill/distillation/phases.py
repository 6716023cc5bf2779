"""How stage two's D sees a batch (Diffusion2GAN §3): the view the shared GAN step runs
(:mod:`distill.training.gan_step`, where the phases and the objective live).

G:    lpips_weight * E-LatentLPIPS(G(z, c), x)  [g_lpips]  + gan_weight * objective.generator(D(G(z~, c) | z~, c))
[g_adv] D:    objective.real(D(x | z, c))  [d_real]  + objective.fake(D(G(z~, c) | z~, c))  [d_fake]
      + objective.fake(D(x | z', c'))  [d_mismatch: mix-and-match; z' always another sample's noise, c' independently
      the own or another prompt]
z~ is the pair's noise z (the paper) or, with fresh GAN noise, a new unit-Gaussian sample: on a small
pair set a from-scratch generator fits the training pairs almost exactly, so fakes made from their
noise are nearly the targets and D learns nothing; on fresh noise D sees what G does off the pairs.
Dreg: every r1_interval steps, r1_interval * r1_gamma / 2 * ||grad_x D(x | z, c)||^2 on one sample (the paper's
single-sample R1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.losses.gan import mix_and_match
from distill.training.gan_step import DLogits
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


class PairsView:
    """The teacher-built D on (latent | noise, prompt) pairs: a :class:`distill.training.gan_step.DiscriminatorView`.
    ``discriminator``: the prepared (DDP) module, for the D phase; ``discriminator_unwrapped``: the G phase's frozen
    forward (None: no GAN term). ``mix_fraction``: the share of each batch's real pairs shown with a wrong condition."""

    def __init__(
        self,
        *,
        student,
        discriminator,
        discriminator_unwrapped,
        lpips_loss,
        regression: str,
        lpips_weight: float,
        mix_fraction: float,
    ):
        self.student, self.discriminator, self.d_unwrapped = student, discriminator, discriminator_unwrapped
        self.lpips_loss, self.regression, self.lpips_weight = lpips_loss, regression, lpips_weight
        self.mix_fraction = mix_fraction

    def generate(self, batch: Batch, rng: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GAN's fake ``[N,C,H,W]`` (from ``batch.fake_noise``) and the weighted regression term."""
        fake = self.student(batch.noise, batch.cond.prompt_embeds, added_cond_kwargs=batch.cond.added_cond_kwargs())
        terms: dict[str, torch.Tensor] = {}
        if self.regression == "elatentlpips" and self.lpips_weight:
            terms["g_lpips"] = self.lpips_weight * self.lpips_loss(fake, batch.target, generator=rng).mean()
        elif self.regression == "mse" and self.lpips_weight:
            terms["g_mse"] = self.lpips_weight * F.mse_loss(fake.float(), batch.target.float())
        if batch.gan_noise is not None:
            fake = self.student(
                batch.gan_noise, batch.cond.prompt_embeds, added_cond_kwargs=batch.cond.added_cond_kwargs()
            )
        return fake, terms

    def fake_logits(self, batch: Batch, fake: torch.Tensor) -> list[torch.Tensor]:
        return self.d_unwrapped(fake, **_d_inputs(batch.fake_noise, batch.cond))

    def discriminator_logits(self, batch: Batch, fake: torch.Tensor, rng: torch.Generator) -> DLogits:
        """Real, fake and mix-and-match pairs through one forward (one DDP reduction per step)."""
        n = batch.target.shape[0]
        k = int(round(self.mix_fraction * n)) if n >= 2 else 0
        latents, noise, conds = [batch.target, fake], [batch.noise, batch.fake_noise], [batch.cond, batch.cond]
        if k:
            noise_index, prompt_index = mix_and_match(n, k, generator=rng)
            latents.append(batch.target[:k])
            noise.append(batch.noise[noise_index])
            conds.append(batch.cond.index(prompt_index))
        cond = TextConditioning(
            torch.cat([c.prompt_embeds for c in conds]),
            None if batch.cond.pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in conds]),
            None if batch.cond.time_ids is None else torch.cat([c.time_ids for c in conds]),
        )
        return DLogits(self.discriminator(torch.cat(latents), **_d_inputs(torch.cat(noise), cond)), n)

    def r1_inputs(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The paper's single-sample R1: the first real pair."""
        return batch.target[:1], _d_inputs(batch.noise[:1], batch.cond.index(slice(0, 1)))
