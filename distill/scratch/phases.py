"""How the from-scratch discriminators see a batch of real samples and their captions (no teacher, no pairs): the
view the shared GAN step runs (:mod:`distill.training.gan_step`, where the phases and the objective live).

G:    objective.generator(D(G(z, c) | c))  [g_adv]  + clip_weight * arccos^2(CLIP(G(z, c)), CLIP(c))  [g_clip,
StyleGAN-T §3.3]
      + mode_seeking_weight / (mean|G(z1, c) - G(z2, c)| / mean|z1 - z2| + 1e-5)  [g_mode_seeking: MSGAN, Mao et al.
      2019, Eq. 3; the second half of the generated batch repeats the first half's captions with other noise]
D:    objective.real(D(x | c))  [d_real]  + objective.fake(D(G(z, c) | c))  [d_fake]
      + mismatch_weight * objective.fake(D(x | c'))  [d_mismatch: GigaGAN's matching-aware term, c' another sample's
      caption; the discriminators reuse the real samples' image features for it (``mismatched=``)]
Dreg: every r1_interval steps, r1_interval * r1_gamma / 2 * ||grad_x D(x | c)||^2 over the real micro-batch (every D of
an ensemble).

Every discriminator takes ``(x, prompt_embeds, added_cond_kwargs, *, pyramid, parts, blur_sigma)`` and augments what it
reads itself (DiffAugment), so the images D sees go through the same augmentation in both phases. Real and generated
samples go through D in one forward (one DDP reduction), as two ``parts`` (normalised separately by a batch-normalising
D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from distill.losses.gan import mismatched_condition
from distill.training.gan_step import DLogits
from students.text import TextConditioning


@dataclass
class RealBatch:
    samples: torch.Tensor  # [N,C,H,W] real samples in the generator's output space (VAE latents or images)
    cond: TextConditioning
    captions: list[str]


def _text(cond: TextConditioning) -> dict:
    return {"prompt_embeds": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs()}


def _cat(a: TextConditioning, b: TextConditioning) -> TextConditioning:
    """The conditioning of a two-part batch (real | generated)."""
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return TextConditioning(
        cat(a.prompt_embeds, b.prompt_embeds),
        cat(a.pooled_prompt_embeds, b.pooled_prompt_embeds),
        cat(a.time_ids, b.time_ids),
    )


def _seed_global(rng: torch.Generator) -> None:
    # DiffAugment (kornia) draws from the global RNG: seeded from this micro-batch's stream, a resumed run repeats it.
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=rng)))


class RealImagesView:
    """The from-scratch Ds on real samples: a :class:`distill.training.gan_step.DiscriminatorView`. The generator draws
    its own noise map ``[N, noise_shape]`` from the micro-batch's stream. ``discriminator``: the prepared (DDP) module;
    ``discriminator_unwrapped``: the G phase's frozen forward and R1. ``blur_sigma``: set by the trainer before each
    step (the fading blur on D's input). ``clip_guidance`` / ``to_images``: StyleGAN-T's CLIP term on G's images."""

    def __init__(
        self,
        *,
        generator,
        discriminator,
        discriminator_unwrapped,
        noise_shape: tuple[int, int, int],
        mismatch: bool,
        clip_guidance=None,
        clip_weight: float = 0.0,
        to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode_seeking_weight: float = 0.0,
    ):
        self.generator, self.discriminator, self.d_unwrapped = generator, discriminator, discriminator_unwrapped
        self.noise_shape, self.mismatch, self.mode_seeking_weight = tuple(noise_shape), mismatch, mode_seeking_weight
        self.clip_guidance, self.clip_weight, self.to_images = clip_guidance, clip_weight, to_images
        self.blur_sigma = 0.0

    def generate(self, batch: RealBatch, rng: torch.Generator):
        """((generated [N,C,H,W], its pyramid coarse -> fine, the captions' conditioning it was made with), the weighted
        CLIP and mode-seeking terms)."""
        _seed_global(rng)
        n, device = batch.samples.shape[0], batch.samples.device
        noise = torch.randn(n, *self.noise_shape, generator=rng).to(device)
        half = n // 2 if self.mode_seeking_weight > 0 else 0
        # Mode seeking compares two samples of one caption: samples half.. 2*half-1 take the first half's captions.
        rows = (
            torch.cat([torch.arange(half), torch.arange(half), torch.arange(2 * half, n)]) if half else torch.arange(n)
        )
        cond = batch.cond.index(rows.to(device)) if half else batch.cond
        fake, pyramid = self.generator(
            noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs(), return_pyramid=True
        )
        terms = {}
        if half:
            ratio = (fake[:half] - fake[half : 2 * half]).abs().mean() / (
                noise[:half] - noise[half : 2 * half]
            ).abs().mean()
            terms["g_mode_seeking"] = self.mode_seeking_weight / (ratio + 1e-5)
        if self.clip_guidance is not None and self.clip_weight > 0:
            captions = [batch.captions[int(i)] for i in rows]
            terms["g_clip"] = (
                self.clip_weight * self.clip_guidance(self.to_images(fake), captions, generator=rng).mean()
            )
        return (fake, pyramid, cond), terms

    def fake_logits(self, batch: RealBatch, generated) -> list[torch.Tensor]:
        fake, pyramid, cond = generated
        d = self.d_unwrapped
        if (
            d.needs_reference
        ):  # D normalises generated samples together with real ones: the real part's logits are dropped
            n = fake.shape[0]
            logits = d(
                torch.cat([fake, batch.samples.to(fake.dtype)]),
                **_text(_cat(cond, batch.cond)),
                parts=2,
                blur_sigma=self.blur_sigma,
            )
            return [l[:n] for l in logits]
        return d(fake, **_text(cond), pyramid=pyramid if d.uses_pyramid else None, blur_sigma=self.blur_sigma)

    def discriminator_logits(self, batch: RealBatch, generated, rng: torch.Generator) -> DLogits:
        """real | generated | (matching-aware) the real samples under another sample's caption, one forward."""
        _seed_global(rng)
        fake, fake_pyramid, fake_cond = generated
        real, n = batch.samples, batch.samples.shape[0]
        mismatched, keep = None, None
        if self.mismatch and n >= 2:
            perm = mismatched_condition(n, generator=rng)
            # Another sample with the same caption is no mismatch (repeated captions): those pairs get no weight.
            keep = torch.tensor([batch.captions[int(j)] != c for j, c in zip(perm, batch.captions)], device=real.device)
            mismatched = _text(batch.cond.index(perm.to(real.device)))
        pyramid = None
        if self.d_unwrapped.uses_pyramid:
            # Real samples' pyramid: area-downsampled to the generator's level sizes.
            pyramid = [torch.cat([F.interpolate(real, size=p.shape[-2:], mode="area"), p]) for p in fake_pyramid]
        logits = self.discriminator(
            torch.cat([real, fake]),
            **_text(_cat(batch.cond, fake_cond)),
            pyramid=pyramid,
            parts=2,
            blur_sigma=self.blur_sigma,
            mismatched=mismatched,
        )
        return DLogits(logits, n, keep)

    def r1_inputs(self, batch: RealBatch) -> tuple[torch.Tensor, dict]:
        return batch.samples, {**_text(batch.cond), "blur_sigma": self.blur_sigma}
