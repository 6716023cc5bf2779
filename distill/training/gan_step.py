"""One GAN training step, shared by stage two (``train_student.py``) and from-scratch training (``train_gan.py``).

The loss phases of StyleGAN2 (G / D / Dreg with lazy R1), with the objective a choice (``non_saturating`` or
``hinge``, :data:`distill.losses.gan.OBJECTIVES`) and one set of logged term names for both trainers:

G:    gan_weight * objective.generator(D(G(z, c) | c))                                  [g_adv]
      + the trainer's own G terms (regression to the teacher: g_lpips / g_mse; CLIP guidance: g_clip)
D:    objective.real(D(x | c))  [d_real]  + objective.fake(D(G(z, c) | c))  [d_fake]
      + mismatch_weight * objective.fake(D(x | c'))  [d_mismatch: real samples under another condition count as fake:
      Diffusion2GAN §3.3's mix-and-match, GigaGAN §3.3's matching-aware term]
Dreg: every r1_interval steps, r1_interval * r1_gamma / 2 * ||grad_x D(x | c)||^2  [d_r1] (lazy R1: StyleGAN2 §B)
Logged beside them, not trained on: the mean logits on real and generated samples (d_real_logit, d_fake_logit).

What differs between the trainers is only how D sees a batch, a :class:`DiscriminatorView`: stage two's teacher-UNet
D reads (latent | noise, prompt) pairs (:mod:`distill.distillation.phases`); the from-scratch Ds read real images or
latents and their captions (:mod:`distill.scratch.phases`). This module also builds what both optimise with: the
Adam / 8-bit Adam optimisers with the generators' per-layer learning rates (:func:`build_gan_optimizers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distill.losses.gan import OBJECTIVES, objective_loss, r1_penalty
from distill.training.ema import EMA, EMA_DTYPES
from distill.training.loop import TrainLoop, micro_batch_loss
from distill.training.optimizers import build_optimizer


@dataclass
class DLogits:
    """One D forward over real | generated | mismatched-real samples: every head's logits, ``n`` real and ``n``
    generated
    samples first, then the mismatched ones; ``keep`` weighs each mismatched sample (None: all count)."""

    logits: list[torch.Tensor]  # per head: [2n(+k), ...]
    n: int
    keep: torch.Tensor | None = None  # [k] bool: a real sample under another sample's identical caption is no mismatch

    def part(self, i: int) -> list[torch.Tensor]:
        return [l[i * self.n : (i + 1) * self.n] for l in self.logits]

    def mismatched(self) -> list[torch.Tensor]:
        return [l[2 * self.n :] for l in self.logits]


class DiscriminatorView(Protocol):
    """How D sees a trainer's micro-batch (``batch``: the trainer's own type). ``rng``: the (seed, rank, micro-batch,
    phase)
    stream; DiffAugment and the mismatched conditions draw from it, so a resumed run repeats them."""

    def generate(self, batch, rng: torch.Generator) -> tuple[Any, dict[str, torch.Tensor]]:
        """G's forward: (its output, kept for the D phase after detaching; the trainer's own weighted G terms)."""

    def fake_logits(self, batch, generated) -> list[torch.Tensor]:
        """D (frozen, unwrapped) on G's output, for the G phase: every head's logits."""

    def discriminator_logits(self, batch, generated, rng: torch.Generator) -> DLogits:
        """D (the prepared module: one DDP reduction) on real | generated (detached) | mismatched samples."""

    def r1_inputs(self, batch) -> tuple[torch.Tensor, dict]:
        """The real samples R1 differentiates D at, and D's other inputs for them."""


def _detach(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


class GANStep:
    """``engine.run(batches)``: one optimiser step of G then (``adversarial``) of D on this step's micro-batches,
    through the shared loop's phases (gradient accumulation, random streams, NaN stop), then the loop's end of step
    (EMA, logs, checkpoint, validation). ``discriminator``: the prepared module (its parameters, its DDP no_sync);
    ``discriminator_unwrapped``: for R1 (DDP has no double backward). ``lr_warmup_steps``: both learning rates rise
    linearly over that many steps (every parameter group from its own rate)."""

    def __init__(
        self,
        loop: TrainLoop,
        *,
        view: DiscriminatorView,
        generator,
        discriminator,
        discriminator_unwrapped,
        opt_g,
        opt_d,
        loss: str,
        gan_weight: float = 1.0,
        mismatch_weight: float = 1.0,
        r1_gamma: float,
        r1_interval: int,
        max_grad_norm: float,
        lr_warmup_steps: int = 0,
    ):
        if loss not in OBJECTIVES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(OBJECTIVES)}")
        self.loop, self.view = loop, view
        self.generator, self.discriminator, self.d_unwrapped = generator, discriminator, discriminator_unwrapped
        self.opt_g, self.opt_d = opt_g, opt_d
        self.objective = OBJECTIVES[loss]
        self.gan_weight, self.mismatch_weight = gan_weight, mismatch_weight
        self.r1_gamma, self.r1_interval = r1_gamma, r1_interval
        self.max_grad_norm, self.lr_warmup_steps = max_grad_norm, lr_warmup_steps
        self.d_params = [p for p in discriminator.parameters() if p.requires_grad] if discriminator is not None else []
        for opt in (opt_g, opt_d):
            for group in opt.param_groups if opt is not None else []:
                group.setdefault("initial_lr", group["lr"])  # what warm-up scales (torch's schedulers' key)

    def r1_due(self, step: int) -> bool:
        return self.r1_gamma > 0 and step % self.r1_interval == 0

    def _warm_up(self, step: int) -> None:
        if self.lr_warmup_steps <= 0:
            return
        factor = min(1.0, (step + 1) / self.lr_warmup_steps)  # a function of the step: nothing to checkpoint
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups if opt is not None else []:
                group["lr"] = group["initial_lr"] * factor

    def run(
        self, batches: list, *, adversarial: bool = True, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """One step over ``batches`` (this step's micro-batches, in order); returns the logged terms."""
        loop, step = self.loop, self.loop.state.step
        adversarial = adversarial and self.discriminator is not None
        self._warm_up(step)
        count = len(batches)
        logs: dict[str, torch.Tensor] = {}

        def g_micro(m, rng):
            generated, terms = self.g_terms(batches[m], rng, adversarial=adversarial)
            return _detach(generated), terms, micro_batch_loss(terms, num_micro_batches=count)

        for p in self.d_params:
            p.requires_grad_(False)
        generated = loop.phase(
            purpose="g",
            model=self.generator,
            optimizer=self.opt_g,
            params=self.generator.parameters(),
            micro_step=g_micro,
            logs=logs,
            max_grad_norm=self.max_grad_norm,
        )
        for p in self.d_params:
            p.requires_grad_(True)
        if adversarial:
            do_r1 = self.r1_due(step)

            def d_micro(m, rng):
                # R1 once per step, on micro-batch 0 (a per-step term: PER_STEP_TERMS, not divided by the
                # micro-batches).
                terms = self.d_terms(batches[m], generated[m], rng, r1=do_r1 and m == 0)
                return None, terms, micro_batch_loss(terms, num_micro_batches=count)

            loop.phase(
                purpose="d",
                model=self.discriminator,
                optimizer=self.opt_d,
                params=self.d_params,
                micro_step=d_micro,
                logs=logs,
                max_grad_norm=self.max_grad_norm,
            )
        return loop.end_step(logs, extra=extra)

    def g_terms(self, batch, rng: torch.Generator, *, adversarial: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
        """G's output on ``batch`` and its weighted terms: the trainer's own and, ``adversarial``, g_adv."""
        generated, terms = self.view.generate(batch, rng)
        if adversarial and self.gan_weight:
            # D frozen; its forward is the unwrapped module, so no DDP reduction is expected.
            terms["g_adv"] = self.gan_weight * objective_loss(
                self.view.fake_logits(batch, generated), self.objective.generator
            )
        return generated, terms

    def d_terms(self, batch, generated, rng: torch.Generator, *, r1: bool = False) -> dict[str, torch.Tensor]:
        """D's weighted terms on ``batch`` and G's (detached) output, + R1 at its lazy weight when ``r1``."""
        terms = self.discriminator_terms(self.view.discriminator_logits(batch, generated, rng))
        if r1:
            x, inputs = self.view.r1_inputs(batch)
            # Lazy R1 (StyleGAN2 §B): every r1_interval steps, scaled by the interval so its average weight is r1_gamma.
            terms["d_r1"] = (self.r1_gamma / 2) * self.r1_interval * r1_penalty(self.d_unwrapped, x, **inputs)
        return terms

    def discriminator_terms(self, d: DLogits) -> dict[str, torch.Tensor]:
        """The weighted D terms of one forward (+ the mean logits, logged only)."""
        obj = self.objective
        real, fake = d.part(0), d.part(1)
        terms = {"d_real": objective_loss(real, obj.real), "d_fake": objective_loss(fake, obj.fake)}
        mismatched = d.mismatched()
        if self.mismatch_weight > 0 and mismatched[0].shape[0] > 0:
            if d.keep is None:
                terms["d_mismatch"] = self.mismatch_weight * objective_loss(mismatched, obj.fake)
            elif d.keep.any():
                per_sample = torch.stack([obj.fake(l.float()).flatten(1).mean(dim=1) for l in mismatched]).mean(
                    dim=0
                )  # [k]
                terms["d_mismatch"] = self.mismatch_weight * (per_sample * d.keep).sum() / d.keep.sum()
        terms["d_real_logit"] = torch.stack([l.detach().float().mean() for l in real]).mean()
        terms["d_fake_logit"] = torch.stack([l.detach().float().mean() for l in fake]).mean()
        return terms


def fan_in_param_groups(module: torch.nn.Module, lr: float) -> list[dict]:
    """Adam parameter groups of ``module``'s trainable parameters in which every conv / linear weight learns at
    lr / sqrt(fan-in), the rest (biases, norms, embeddings) at lr. Adam moves each stored weight by about lr a step;
    for He-scale weights (~1 / sqrt(fan-in)) the per-layer rate moves every layer by the same fraction of its scale,
    which is what StyleGAN2's equalised learning rate does for its D (Karras et al. 2018, §4.1)."""
    by_fan_in: dict[int, list] = {}
    rest = []
    for layer in module.modules():
        weighted = isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
        for p in layer.parameters(recurse=False):
            if not p.requires_grad:
                continue
            if weighted and p.ndim >= 2:
                by_fan_in.setdefault(p[0].numel(), []).append(p)
            else:
                rest.append(p)
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + [{"params": ps, "lr": lr / fan_in**0.5} for fan_in, ps in sorted(by_fan_in.items())]


def build_gan_optimizers(
    *,
    generator,
    discriminator,
    optimizer: str,
    learning_rate_g: float,
    learning_rate_d: float,
    betas: tuple[float, float],
    linear_lr_by_fan_in: bool,
    d_lr_by_fan_in: bool = False,
):
    """(opt_g, opt_d): Adam or 8-bit Adam (``optimizer``) for G and for D's trainable parameters (None without a D).
    ``linear_lr_by_fan_in``: a style generator's plain linear layers at lr / sqrt(fan-in), as if equalised
    (``StyleGenerator.optimizer_param_groups``); other generators (the UNet student) have one rate.
    ``d_lr_by_fan_in``: every D conv / linear weight at lr / sqrt(fan-in) (:func:`fan_in_param_groups`: a from-scratch D
    with He-scale weights); off: one rate (a D made from a pretrained network)."""
    groups = getattr(generator, "optimizer_param_groups", None)
    g_params = groups(learning_rate_g) if linear_lr_by_fan_in and groups is not None else generator.parameters()
    opt_g = build_optimizer(optimizer, g_params, lr=learning_rate_g, betas=betas)
    if discriminator is None:
        return opt_g, None
    d_params = (
        fan_in_param_groups(discriminator, learning_rate_d)
        if d_lr_by_fan_in
        else [p for p in discriminator.parameters() if p.requires_grad]
    )
    return opt_g, build_optimizer(optimizer, d_params, lr=learning_rate_d, betas=betas)


def to_channels_last(*modules: torch.nn.Module) -> None:
    """The modules' 4-D weights (convolutions) in channels_last memory, in place: oneDNN (CPU) and cuDNN run their
    convolutions in that layout natively, so the per-call reorders go. Values, names and shapes are unchanged (a
    checkpoint stores them contiguous)."""
    for module in modules:
        for param in module.parameters():
            if param.dim() == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)


def build_ema(generator, *, half_life_kimg: float, rampup: float, device: str = "same", dtype: str = "fp32") -> EMA:
    """The generator's EMA (what both trainers export): ``device`` "same" or "cpu", ``dtype`` "fp32" or "bf16" (memory
    levers)."""
    return EMA(
        generator,
        half_life_kimg=half_life_kimg,
        rampup=rampup or None,
        device="cpu" if device == "cpu" else None,
        dtype=EMA_DTYPES[dtype],
    )
