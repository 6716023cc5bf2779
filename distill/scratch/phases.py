"""The loss phases of one from-scratch text-to-image GAN step (no teacher, no pairs): G, then D with lazy R1.

G:    objective.generator(D(G(z, c) | c))  [g_adv]  + clip_weight * arccos^2(CLIP(G(z, c)), CLIP(c))  [g_clip, StyleGAN-T §3.3]
D:    objective.real(D(x | c))  [d_real]  + objective.fake(D(G(z, c) | c))  [d_fake]
      + mismatch_weight * objective.fake(D(x | c'))  [d_mismatch: GigaGAN's matching-aware term, c' another sample's caption;
      the discriminators reuse the real samples' image features for it (``mismatched=``)]
Dreg: every r1_interval steps, r1_interval * r1_gamma / 2 * ||grad_x D(x | c)||^2 over the real micro-batch.

``objective`` is non-saturating or hinge (:data:`distill.losses.gan.OBJECTIVES`). Every discriminator takes
``(x, prompt_embeds, added_cond_kwargs, *, pyramid, parts, blur_sigma)`` and augments what it reads itself
(DiffAugment), so the images D sees go through the same augmentation in both phases. Real and generated
samples go through D in one forward (one DDP reduction), as two ``parts`` (normalised separately by a
batch-normalising D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from distill.losses.gan import Objective, mismatched_condition, objective_loss, r1_penalty
from students.text import TextConditioning



@dataclass
class RealBatch:
    samples: torch.Tensor  # [N,C,H,W] real samples in the generator's output space (VAE latents or images)
    cond: TextConditioning
    captions: list[str]


def _text(cond: TextConditioning) -> dict:
    return {"prompt_embeds": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs()}


def _cat(conds: list[TextConditioning]) -> TextConditioning:
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return TextConditioning(cat([c.prompt_embeds for c in conds]), cat([c.pooled_prompt_embeds for c in conds]),
                            cat([c.time_ids for c in conds]))


def _mean_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([l.detach().float().mean() for l in logits]).mean()


def generator_terms(*, generator_model, discriminator, batch: RealBatch, noise: torch.Tensor, objective: Objective,
                    blur_sigma: float, clip_guidance=None, clip_weight: float = 0.0,
                    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    rng: torch.Generator | None = None) -> tuple[tuple[torch.Tensor, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """((fake [N,C,H,W], its pyramid coarse -> fine), weighted G terms). ``discriminator`` is used frozen (the caller
    turns its gradients off); ``to_images`` maps samples to images in [-1, 1] for CLIP guidance."""
    fake, pyramid = generator_model(noise, batch.cond.prompt_embeds, added_cond_kwargs=batch.cond.added_cond_kwargs(),
                                    return_pyramid=True)
    if discriminator.needs_reference:  # D normalises generated samples together with real ones: the real part's logits are dropped
        n = fake.shape[0]
        logits = discriminator(torch.cat([fake, batch.samples.to(fake.dtype)]), **_text(_cat([batch.cond, batch.cond])), parts=2,
                               blur_sigma=blur_sigma)
        logits = [l[:n] for l in logits]
    else:
        logits = discriminator(fake, **_text(batch.cond), pyramid=pyramid if discriminator.uses_pyramid else None,
                               blur_sigma=blur_sigma)
    terms = {"g_adv": objective_loss(logits, objective.generator)}
    if clip_guidance is not None and clip_weight > 0:
        terms["g_clip"] = clip_weight * clip_guidance(to_images(fake), batch.captions, generator=rng).mean()
    return (fake, pyramid), terms


def discriminator_terms(*, discriminator, discriminator_unwrapped, batch: RealBatch, fake: torch.Tensor,
                        fake_pyramid: list[torch.Tensor], objective: Objective, mismatch_weight: float, r1_gamma: float,
                        r1_interval: int, do_r1: bool, blur_sigma: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Weighted D terms (+ ``d_real_logit`` / ``d_fake_logit``: the mean logits, logged, not trained on). R1 uses the
    unwrapped module because DDP does not support double backward."""
    real, n = batch.samples, batch.samples.shape[0]
    mismatched = None
    if mismatch_weight > 0 and n >= 2:
        perm = mismatched_condition(n, generator=generator)
        # Another sample with the same caption is no mismatch (repeated captions): those pairs get no weight.
        keep = torch.tensor([batch.captions[int(j)] != c for j, c in zip(perm, batch.captions)], device=real.device)
        mismatched = _text(batch.cond.index(perm.to(real.device)))
    pyramid = None
    if discriminator_unwrapped.uses_pyramid:
        # Real samples' pyramid: area-downsampled to the generator's level sizes.
        pyramid = [torch.cat([F.interpolate(real, size=p.shape[-2:], mode="area"), p.detach()]) for p in fake_pyramid]
    logits = discriminator(torch.cat([real, fake.detach()]), **_text(_cat([batch.cond, batch.cond])), pyramid=pyramid, parts=2,
                           blur_sigma=blur_sigma, mismatched=mismatched)
    part = lambda i: [l[i * n:(i + 1) * n] for l in logits]  # noqa: E731  real | generated | real under another caption
    terms = {"d_real": objective_loss(part(0), objective.real), "d_fake": objective_loss(part(1), objective.fake)}
    if mismatched is not None and keep.any():
        per_sample = torch.stack([objective.fake(l.float()).flatten(1).mean(dim=1) for l in part(2)]).mean(dim=0)  # [n]
        terms["d_mismatch"] = mismatch_weight * (per_sample * keep).sum() / keep.sum()
    if do_r1 and r1_gamma > 0:
        penalty = r1_penalty(discriminator_unwrapped, real, **_text(batch.cond), blur_sigma=blur_sigma)
        terms["d_r1"] = (r1_gamma / 2) * r1_interval * penalty
    terms["d_real_logit"], terms["d_fake_logit"] = _mean_logit(part(0)), _mean_logit(part(1))
    return terms

