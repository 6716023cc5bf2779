"""Building the from-scratch GAN's parts from a config (``distill/train_gan.py``): the frozen text encoder(s)
and VAE (:func:`load_frozen`; a fixed caption set is encoded once, :class:`CaptionTable`), then the generator (from
the student registry, its output set to the data's statistics), the chosen discriminator and CLIP guidance
(:func:`add_networks`); exporting the pipeline and drawing the validation grid.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers.utils import make_image_grid

from distill.losses.clip_guidance import CLIPGuidance
from students import OneStepGANPipeline, TextConditioning, encode_text
from students.export import save_standalone
from students.latents import scale_latents, vae_scale_factor
from students.registry import GENERATORS
from teachers.loading import load_components

DISCRIMINATORS = ("projected", "multiscale", "unet", "projected+multiscale")
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


class CaptionTable:
    """The text conditioning of a fixed caption set, encoded once (``chunk`` captions a call, in sorted order) and read
    back by caption: the frozen text encoder then runs once per distinct caption instead of once per sample and step.
    Every caption's rows come from the same call whatever the batch, so a resumed run reads the same numbers."""

    def __init__(self, captions: list[str], *, encode: Callable[[list[str]], TextConditioning], chunk: int = 64):
        ordered = sorted(set(captions))
        self.index = {c: i for i, c in enumerate(ordered)}
        parts = [encode(ordered[i : i + chunk]) for i in range(0, len(ordered), chunk)]
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        self.cond = TextConditioning(
            cat([c.prompt_embeds for c in parts]),
            cat([c.pooled_prompt_embeds for c in parts]),
            cat([c.time_ids for c in parts]),
        )

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def __call__(self, captions: list[str]) -> TextConditioning:
        return self.cond.index(torch.tensor([self.index[c] for c in captions], device=self.cond.prompt_embeds.device))


@dataclass
class ScratchParts:
    text: dict  # tokenizer, text_encoder (+ tokenizer_2, text_encoder_2 for SDXL's two encoders)
    vae: torch.nn.Module | None  # None: pixel space
    generator: torch.nn.Module | None  # None until add_networks
    discriminator: torch.nn.Module | None
    clip_guidance: torch.nn.Module | None
    resolution: int  # image side in pixels
    captions: CaptionTable | None = None  # the dataset's captions encoded once (None: encoded per batch)

    def encode(self, prompts: list[str]) -> TextConditioning:
        prompts = list(prompts)
        if self.captions is not None and all(p in self.captions for p in prompts):
            return self.captions(prompts)
        return encode_text(prompts, resolution=(self.resolution, self.resolution), **self.text)

    def tabulate(self, captions: list[str] | None) -> None:
        """Encode ``captions`` (every distinct caption of the data set; None: too many to hold) once, from now on read
        back."""
        self.captions = CaptionTable(captions, encode=self.encode) if captions else None

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Generator outputs -> images in [-1, 1] (differentiable: CLIP guidance backpropagates through it)."""
        from students.latents import decode_vae

        return decode_vae(self.vae, samples).to(samples.dtype)

    @torch.no_grad()
    def to_samples(self, images: torch.Tensor, *, sampling: str, generator: torch.Generator | None) -> torch.Tensor:
        """Images in [-1, 1] -> what the generator outputs: VAE-scaled latents (or the images in pixel space)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        raw = dist.sample(generator=generator) if sampling == "sample" else dist.mode()
        return scale_latents(raw, self.vae.config).float()


def caption_bytes(parts: ScratchParts) -> int:
    """The bytes one caption's conditioning takes (tokens x width of every encoder, a pooled vector): sizes the caption
    table."""
    per = 0
    for tok, enc in (
        (parts.text["tokenizer"], parts.text["text_encoder"]),
        (parts.text["tokenizer_2"], parts.text["text_encoder_2"]),
    ):
        if enc is not None:
            per += int(tok.model_max_length) * int(enc.config.hidden_size) + int(
                getattr(enc.config, "projection_dim", 0)
            )
    return 4 * per + 4 * 6  # float32, + SDXL's time ids


def check_resolution(*, resolution: int, generator: str, size: str, factor: int) -> int:
    """The generator's sample size for images of ``resolution`` px; one line when it does not fit."""
    levels = len(GENERATORS[generator][1][size]["block_out_channels"])
    multiple = factor * 2 ** (levels - 1)
    if resolution <= 0 or resolution % multiple:
        lo, hi = (resolution // multiple) * multiple, (resolution // multiple + 1) * multiple
        raise ValueError(
            f"resolution {resolution} is not a multiple of {multiple} (VAE factor {factor} x 2**{levels - 1} for the "
            f"{levels} levels of {generator} {size}): use {lo or hi} or {hi}"
        )
    return resolution // factor


def load_frozen(cfg, *, device) -> ScratchParts:
    """The frozen text encoder(s) and VAE (none in pixel space), and a check that the generator fits the resolution; the
    networks that train are added by :func:`add_networks`."""
    from distill.core.pretrained import load_vae

    text = {
        k: v.to(device) if isinstance(v, torch.nn.Module) else v
        for k, v in load_components(cfg.text_encoder, TEXT_COMPONENTS, what="text_encoder").items()
    }
    if text["text_encoder"] is None:
        raise ValueError(
            f"{cfg.text_encoder} has no text_encoder component: pass a diffusers text-to-image pipeline (folder or "
            "hub id)"
        )
    vae = load_vae(cfg.vae, subfolder=cfg.vae_subfolder).to(device) if cfg.space == "latent" else None
    check_resolution(
        resolution=cfg.resolution, generator=cfg.generator, size=cfg.generator_size, factor=vae_scale_factor(vae)
    )
    return ScratchParts(
        text=text, vae=vae, generator=None, discriminator=None, clip_guidance=None, resolution=cfg.resolution
    )


def add_networks(
    parts: ScratchParts, cfg, *, device, latent_stats: tuple[list[float], list[float]] | None = None
) -> ScratchParts:
    """The generator and discriminator (trainable) and CLIP guidance (optional), in place. ``latent_stats``: the real
    samples' per-channel (mean, std), which the generator's output is set to (``output_latent_stats``)."""
    from distill.discriminators import DiscriminatorEnsemble

    vae, text = parts.vae, parts.text
    side = cfg.resolution // vae_scale_factor(vae)
    channels = int(vae.config.latent_channels) if vae is not None else 3
    te2 = text["text_encoder_2"]
    context_dim = int(text["text_encoder"].config.hidden_size) + (int(te2.config.hidden_size) if te2 is not None else 0)
    pooled_dim = int(te2.config.projection_dim) if te2 is not None else 0
    generator_class = GENERATORS[cfg.generator][0]
    overrides = {} if cfg.mapping_lr_mul is None else {"mapping_lr_mul": cfg.mapping_lr_mul}
    if latent_stats is not None:
        overrides.update(latent_mean=tuple(latent_stats[0]), latent_std=tuple(latent_stats[1]))
    generator = generator_class.for_latents(
        latent_channels=channels,
        sample_size=side,
        cross_attention_dim=context_dim,
        pooled_dim=pooled_dim,
        size=cfg.generator_size,
        **overrides,
    ).to(device)
    kinds = cfg.discriminator.split("+")
    members = [
        _discriminator(kind, cfg, vae=vae, channels=channels, side=side, context_dim=context_dim, pooled_dim=pooled_dim)
        for kind in kinds
    ]
    disc = members[0] if len(members) == 1 else DiscriminatorEnsemble(members)
    clip = None
    if cfg.clip_guidance_weight > 0:
        try:
            clip = load_clip_guidance(cfg.clip_model, cfg.clip_pretrained, crop=cfg.clip_crop, device=device)
        except FileNotFoundError as exc:  # optional: train without it, saying why in one line
            sys.stderr.write(f"warning: CLIP guidance is off: {exc}\n")
    parts.generator, parts.discriminator, parts.clip_guidance = generator, disc.to(device), clip
    return parts


def _discriminator(
    kind: str, cfg, *, vae, channels: int, side: int, context_dim: int, pooled_dim: int
) -> torch.nn.Module:
    """One discriminator of ``kind`` (projected, multiscale or unet) from the config's ``d_*`` keys."""
    from distill.discriminators import (
        LatentDecoder,
        MultiScaleDiscriminator,
        ProjectedDiscriminator,
        UnpairedUNetDiscriminator,
        build_feature_network,
    )

    if kind == "projected":
        layers = tuple(x.strip() for x in cfg.d_feature_layers.split(",") if x.strip())
        features = build_feature_network(
            cfg.d_feature_network, layers=layers, weights=cfg.d_feature_weights, resolution=cfg.d_feature_resolution
        )
        disc = ProjectedDiscriminator(
            features,
            context_dim=context_dim,
            pooled_dim=pooled_dim,
            cmap_dim=cfg.d_cmap_dim,
            text_dim=cfg.d_text_dim,
            virtual_batch=cfg.d_virtual_batch,
            augment=cfg.augment,
            mixed_norm=cfg.d_norm == "mixed",
            mbstd_group=cfg.d_mbstd_group,
            decode=LatentDecoder(vae) if vae is not None else None,
        )
    elif kind == "multiscale":
        widths = tuple(int(c) for c in cfg.d_channels.split(","))
        disc = MultiScaleDiscriminator(
            in_channels=channels,
            resolution=side,
            context_dim=context_dim,
            pooled_dim=pooled_dim,
            channels=widths,
            text_dim=cfg.d_text_dim,
            cmap_dim=cfg.d_cmap_dim,
            augment=cfg.augment,
            mbstd_group=cfg.d_mbstd_group,
            generator_pyramid=cfg.d_pyramid == "generator",
        )
    else:
        unet = load_components(cfg.teacher, ("unet",), what="teacher")["unet"]
        if unet is None or vae is None or int(unet.config.in_channels) != channels:
            raise ValueError(
                f"discriminator unet needs a diffusion model on this VAE's latents: teacher {cfg.teacher!r} has "
                f"{'no UNet' if unet is None else str(unet.config.in_channels) + '-channel latents'}, space "
                f"{cfg.space!r}"
            )
        heads = tuple(h.strip() for h in cfg.d_heads.split(",") if h.strip())
        disc = UnpairedUNetDiscriminator(unet, timestep=cfg.d_timestep, heads=heads, augment=cfg.augment)
    return disc


def load_clip_guidance(model_name: str, pretrained: str, *, crop: int, device) -> CLIPGuidance:
    """CLIP guidance with an open_clip model by name and pretrained tag / local file (``random-tiny``: random
    weights, tests only); weights absent locally raise FileNotFoundError naming how to get them."""
    import open_clip

    from distill.core.pretrained import load_open_clip, random_tiny_open_clip

    if model_name == "random-tiny":
        model, _, tokenizer = random_tiny_open_clip(device=device)
        return CLIPGuidance(model, tokenizer, crop=crop).to(device)
    model = load_open_clip(model_name, pretrained, device=device)
    return CLIPGuidance(model, open_clip.get_tokenizer(model_name), crop=crop).to(device)


def export_pipeline(parts: ScratchParts, generator: torch.nn.Module, path: Path) -> None:
    """Save ``generator`` with the VAE (None in pixel space) and text encoder(s) as a self-contained
    ``OneStepGANPipeline`` folder (its code next to the weights, as the distilled students)."""
    save_standalone(OneStepGANPipeline(student=generator, vae=parts.vae, **parts.text), path)


@torch.no_grad()
def sample_grid(
    parts: ScratchParts, generator: torch.nn.Module, *, prompts: list[str], noise: torch.Tensor, path: Path
) -> None:
    """One row per prompt, one column per noise map ([K,C,h,w], the same in every row), saved as a PNG."""
    was_training = generator.training
    generator.eval()
    pipe = OneStepGANPipeline(student=generator, vae=parts.vae, **parts.text)
    k = noise.shape[0]
    images = pipe(
        [p for p in prompts for _ in range(k)], latents=noise.repeat(len(prompts), 1, 1, 1), output_type="pil"
    ).images
    generator.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(prompts), cols=k).save(path)
