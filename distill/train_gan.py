"""Train a GigaGAN or StyleGAN-T generator from scratch as a text-to-image GAN: no teacher, no pairs.

    accelerate launch distill/train_gan.py --config configs/scratch/digits_gigagan.yaml [--key value ...]

Data: any ``datasets`` image–caption set (hub name, imagefolder + metadata, Parquet, webdataset, streaming) or
a latent cache (``distill/cache_latents.py``); the generator works in a VAE's latent space or in pixels,
draws its own noise map z, and reads the prompt through the text encoder of ``text_encoder`` (any diffusers
text-to-image pipeline). Discriminator: StyleGAN-T's projected D (hinge loss, frozen feature network), GigaGAN's
multi-scale D on the generator's pyramid (+ matching-aware term, R1), or a diffusion model's UNet. Shared with
``train_student.py``: the loop (distill/training/loop.py), checkpoints and exact resume, EMA, NaN stop. The EMA
generator is saved as a ``OneStepGANPipeline`` (``OUTPUT_DIR/pipeline``) for ``evaluate.py`` and ``sample.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from distill.core.config import (
    ConfigError,
    command,
    config_dict,
    parse_config,
    require_non_negative,
    require_positive,
    with_default,
)
from distill.core.lock import locked
from distill.scratch.setup import DISCRIMINATORS, add_networks, caption_bytes, export_pipeline, load_frozen, sample_grid
from distill.training.checkpoint import resolve_resume
from distill.training.gan_step import GANStep, build_ema, build_gan_optimizers, to_channels_last
from distill.training.loop import TrainLoop, state_bytes
from distill.training.run_config import GANRunConfig, check_gan_keys
from distill.training.run_record import check_resume, save_run_config
from distill.training.trackers import tracker_config
from students.registry import GENERATORS as GENERATOR_CLASSES

GENERATORS = tuple(GENERATOR_CLASSES)


@dataclass
class GANConfig(GANRunConfig):
    output_dir: str = with_default(GANRunConfig, "output_dir", "runs/gan")
    batch_size: int = with_default(GANRunConfig, "batch_size", 32)
    num_workers: int = with_default(
        GANRunConfig, "num_workers", 0, help="DataLoader workers decoding images (map-style datasets)"
    )
    tracker_project_name: str = with_default(GANRunConfig, "tracker_project_name", "train_gan")
    learning_rate_g: float = with_default(
        GANRunConfig, "learning_rate_g", 2e-3, help="Adam lr of the generator (StyleGAN-T: 0.002)"
    )
    loss: str = with_default(GANRunConfig, "loss", "hinge")
    r1_gamma: float = with_default(
        GANRunConfig, "r1_gamma", 0.0, help="R1 weight (0 = off; the projected D needs none)"
    )
    validation_steps: int = with_default(GANRunConfig, "validation_steps", 500, help="sample grid every N steps")
    validation_prompts: list[str] = with_default(
        GANRunConfig,
        "validation_prompts",
        default_factory=list,
        help="prompts of the sample grid (a list, as in train_student.py and diffusers' examples); empty: "
        "validation_prompt_file, else captions of rows spread over the set",
    )
    dataset: str = field(
        default="",
        metadata={
            "help": "datasets hub name, local folder (imagefolder + metadata.jsonl/csv, Parquet, webdataset .tar) or "
            "a latent cache"
        },
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    image_column: str = field(default="image", metadata={"help": "image column"})
    caption_column: str = field(
        default="text", metadata={"help": "caption column (a string, or a list: one drawn per use)"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "stream the dataset (sets that do not fit on disk); read in shard order"}
    )
    resolution: int = field(default=256, metadata={"help": "image side in pixels (centre crop + resize)"})
    space: str = field(
        default="latent", metadata={"help": "latent (a VAE's latent space) or pixel", "choices": ("latent", "pixel")}
    )
    vae: str = field(
        default="", metadata={"help": "diffusers model path or hub id holding the AutoencoderKL (space latent)"}
    )
    vae_subfolder: Optional[str] = field(default="vae", metadata={"help": "subfolder of `vae` (null / . for the root)"})
    latent_sampling: str = field(
        default="sample",
        metadata={"help": "sample or mode of the VAE posterior (on-the-fly encoding)", "choices": ("sample", "mode")},
    )
    text_encoder: str = field(
        default="",
        metadata={
            "help": "diffusers pipeline (folder or hub id) whose text encoder(s) + tokenizer(s) read the prompts"
        },
    )
    generator: str = field(
        default="gigagan",
        metadata={
            "help": "generator",
            "choices": GENERATORS,
            "hints": {
                name: f"the {name} student needs a teacher: use distill/train_student.py"
                for name in ("unet", "transformer")
            },
        },
    )
    generator_size: str = field(
        default="base", metadata={"help": "generator size preset", "choices": tuple(GENERATOR_CLASSES["gigagan"][1])}
    )
    discriminator: str = field(
        default="projected",
        metadata={
            "help": "discriminator (a+b: both, judged as one: their heads' logits together)",
            "choices": DISCRIMINATORS,
        },
    )
    d_feature_network: str = field(
        default="timm:vit_small_patch16_224.dino",
        metadata={"help": "projected D: torchvision:NAME, timm:NAME, open_clip:MODEL/TAG or a classifier folder"},
    )
    d_feature_layers: str = field(
        default="",
        metadata={"help": "projected D: hooked module names, comma-separated (empty: the network's default)"},
    )
    d_feature_weights: str = field(
        default="", metadata={"help": "projected D: a local weights file for the feature network (random: tests only)"}
    )
    d_feature_resolution: int = field(
        default=0, metadata={"help": "projected D: feature network input side (0: its own)"}
    )
    d_virtual_batch: int = field(
        default=8, metadata={"help": "projected D: samples per virtual batch of its batch norm (0 = no normalisation)"}
    )
    d_norm: str = field(
        default="separate",
        metadata={
            "help": "projected D: batch statistics of real and generated samples separate (StyleGAN-T) or mixed "
            "(shared, so their mean / scale differences stay visible)",
            "choices": ("separate", "mixed"),
        },
    )
    d_channels: str = field(
        default="64,128,256", metadata={"help": "multiscale D: trunk widths, fine to coarse (one scale each)"}
    )
    d_mbstd_group: int = field(
        default=0,
        metadata={
            "help": "projected / multiscale D: minibatch-std group size (0 = off; 4 in StyleGAN2): D sees each "
            "group's spread, so a collapsed generator shows"
        },
    )
    d_pyramid: str = field(
        default="generator",
        metadata={
            "help": "multiscale D: the coarser scales of generated samples from the generator's own pyramid "
            "(GigaGAN) or area-downsampled from its output, as real ones",
            "choices": ("generator", "downsample"),
        },
    )
    d_lr_by_fan_in: bool = field(
        default=True,
        metadata={
            "help": "every conv / linear weight of D at learning_rate_d / sqrt(fan-in), as StyleGAN2's equalised D "
            "(the multiscale D's He-scale weights; false: one rate)"
        },
    )
    d_text_dim: int = field(default=256, metadata={"help": "projected / multiscale D: width of the pooled text vector"})
    d_cmap_dim: int = field(default=64, metadata={"help": "projected / multiscale D: channels of the text projection"})
    teacher: str = field(default="", metadata={"help": "unet D: the diffusion pipeline whose UNet becomes D"})
    d_heads: str = field(default="before,skip,after,final", metadata={"help": "unet D: heads"})
    augment: str = field(
        default="color,translation,cutout", metadata={"help": "DiffAugment policy on everything D sees ('' = off)"}
    )
    blur_sigma: float = field(
        default=2.0, metadata={"help": "D input blur at the start, in pixels of its input (0 = off)"}
    )
    blur_fade_kimg: float = field(default=20.0, metadata={"help": "the blur fades to 0 over this many thousand images"})
    mismatch_weight: float = field(
        default=0.0,
        metadata={
            "help": "GigaGAN's matching-aware term: real images with another caption as fake (0 = off; with the "
            "projected D it stalls D early on)"
        },
    )
    mode_seeking_weight: float = field(
        default=0.0,
        metadata={
            "help": "MSGAN's mode-seeking term (G: 1 / (image distance / noise distance) between two samples of one "
            "caption; 0 = off): keeps a caption from drawing one image whatever the noise"
        },
    )
    clip_guidance_weight: float = field(
        default=0.0,
        metadata={
            "help": "CLIP guidance weight (StyleGAN-T: 0.2; 0 = off; skipped with a warning if the weights are absent)"
        },
    )
    clip_model: str = field(default="ViT-B-32", metadata={"help": "open_clip model for CLIP guidance"})
    clip_pretrained: str = field(
        default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag or local weights file"}
    )
    clip_crop: int = field(
        default=64, metadata={"help": "CLIP guidance on a random crop of this side when the image is larger"}
    )
    text_cache_mb: int = field(
        default=1024,
        metadata={
            "help": "encode every distinct caption of a map-style set once and keep it, if they fit in this many MB "
            "(0 = encode each batch's captions)"
        },
    )
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "hold G's and D's convolution weights in channels_last, oneDNN's and cuDNN's native layout "
            "(1.11x the images/s of the digits recipe on 2 CPU cores)"
        },
    )
    validation_prompt_file: str = field(
        default="",
        metadata={
            "help": "prompts of the sample grid from a file (as evaluate's `prompts`), when validation_prompts is empty"
        },
    )
    validation_images: int = field(default=4, metadata={"help": "sample-grid columns (fixed noise maps)"})
    validation_rows: int = field(default=10, metadata={"help": "sample-grid rows (prompts, spread over the file)"})


def check(cfg: GANConfig) -> None:
    for key, needed in (
        ("dataset", True),
        ("text_encoder", True),
        ("vae", cfg.space == "latent"),
        ("teacher", cfg.discriminator == "unet"),
    ):
        if needed and not getattr(cfg, key):
            raise ConfigError(f"set `{key}` (see --help)")
    check_gan_keys(cfg)
    require_positive(cfg, "resolution", "d_text_dim", "d_cmap_dim")
    require_non_negative(
        cfg,
        "blur_sigma",
        "blur_fade_kimg",
        "mismatch_weight",
        "mode_seeking_weight",
        "clip_guidance_weight",
        "clip_crop",
        "validation_images",
        "validation_rows",
        "d_feature_resolution",
        "d_virtual_batch",
        "d_mbstd_group",
        "text_cache_mb",
    )
    if "+" in cfg.discriminator and (cfg.d_pyramid != "downsample" or cfg.d_norm != "separate"):
        raise ConfigError(
            f"discriminator {cfg.discriminator} judges both Ds on the same inputs: set d_pyramid downsample and "
            "d_norm separate"
        )
    if cfg.validation_prompt_file and not cfg.validation_prompts and not Path(cfg.validation_prompt_file).exists():
        raise ConfigError(
            f"validation_prompt_file {cfg.validation_prompt_file} not found: pass an existing prompts file, "
            "or the prompts themselves as --validation_prompts"
        )


@command
def main() -> None:
    cfg = parse_config(GANConfig, description=__doc__)
    check(cfg)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    from distill.scratch.data import check_real_data

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    cfg.mixed_precision = accelerator.mixed_precision  # unset: the launcher's choice; the run records what it used
    if resolve_resume(out, cfg.resume_from_checkpoint) is not None:  # a changed run is refused before anything loads
        check_resume(out, config=config_dict(cfg))
    # The data before the output folder: no captions, a blank one or an unreadable image stop the run with nothing
    # written.
    ds = check_real_data(cfg, rank=accelerator.process_index, world=accelerator.num_processes, gather=gather_object)
    with locked(
        out,
        purpose="train_gan",
        is_main_process=accelerator.is_main_process,
        broadcast=lambda x: broadcast_object_list([x])[0],
    ):
        train(cfg, accelerator=accelerator, ds=ds)
    # leave together: a rank that tears down gloo while its peer still exports can abort
    accelerator.wait_for_everyone()
    accelerator.end_training()


def train(cfg: GANConfig, *, accelerator, ds=None) -> None:
    """The training loop, with ``output_dir`` locked (``ds``: the dataset :func:`check_real_data` opened)."""
    from accelerate.utils import gather_object, set_seed

    from data_gen.prompts import load_prompts
    from distill.discriminators.inputs import blur_sigma
    from distill.scratch.data import RealData
    from distill.scratch.phases import RealImagesView

    # 1. Build: text encoder(s) and VAE; the data (its captions encoded once, its statistics); G, D, CLIP guidance;
    # EMA and optimisers.
    out, device = Path(cfg.output_dir), accelerator.device
    set_seed(cfg.seed)  # same initial weights on every rank
    parts = load_frozen(cfg, device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    data = RealData(
        dataset=cfg.dataset,
        split=cfg.split,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        streaming=cfg.streaming,
        config_name=cfg.dataset_config,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world=world,
        num_workers=cfg.num_workers,
        latent_sampling=cfg.latent_sampling,
        encode=parts.encode,
        to_samples=parts.to_samples,
        device=device,
        gather=gather_object,
        vae_config=parts.vae.config if parts.vae is not None else None,
        ds=ds,
    )
    parts.tabulate(data.distinct_captions(limit=cfg.text_cache_mb * 2**20 // caption_bytes(parts)))
    add_networks(parts, cfg, device=device, latent_stats=data.sample_statistics() if cfg.output_latent_stats else None)
    gen, disc = parts.generator, parts.discriminator
    if cfg.channels_last:
        to_channels_last(gen, disc)
    ema = build_ema(
        gen, half_life_kimg=cfg.ema_half_life_kimg, rampup=cfg.ema_rampup, device=cfg.ema_device, dtype=cfg.ema_dtype
    )
    opt_g, opt_d = build_gan_optimizers(
        generator=gen,
        discriminator=disc,
        optimizer=cfg.optimizer,
        learning_rate_g=cfg.learning_rate_g,
        learning_rate_d=cfg.learning_rate_d,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        linear_lr_by_fan_in=cfg.linear_lr_by_fan_in,
        d_lr_by_fan_in=cfg.d_lr_by_fan_in,
    )

    # 2. Prepare: DDP, the shared loop (checkpoints, EMA, logs), resume; the validation grid's prompts and noise.
    gen, disc, opt_g, opt_d = accelerator.prepare(gen, disc, opt_g, opt_d)
    unwrap_d = accelerator.unwrap_model(disc)
    shape = accelerator.unwrap_model(gen).config
    noise_shape = (shape.latent_channels, shape.sample_size, shape.sample_size)
    grid_noise = torch.randn(cfg.validation_images, *noise_shape, generator=torch.Generator().manual_seed(cfg.seed))
    prompts = (
        list(cfg.validation_prompts)
        or (load_prompts(cfg.validation_prompt_file) if cfg.validation_prompt_file else [])
        or data.some_captions(64)
    )
    rows = max(1, min(cfg.validation_rows, len(prompts)))
    grid_prompts = [prompts[i * len(prompts) // rows] for i in range(rows)]

    def validate(step: int) -> None:
        if accelerator.is_main_process:
            sample_grid(
                parts, ema.model, prompts=grid_prompts, noise=grid_noise, path=out / "samples" / f"step-{step:06d}.png"
            )

    loop = TrainLoop(
        accelerator,
        output_dir=out,
        seed=cfg.seed,
        max_train_steps=cfg.max_train_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        batch_size=cfg.batch_size,
        checkpointing_steps=cfg.checkpointing_steps,
        validation_steps=cfg.validation_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit,
        ema=ema,
        model=gen,
        export=lambda path: export_pipeline(parts, ema.model, path),
        validate=validate,
        checkpoint_bytes=lambda: state_bytes(models=[gen, disc, ema.model, ema.model], optimizers=[opt_g, opt_d]),
    )
    loop.keep("data_streams", data)  # the stream positions (map-style data needs none)
    loop.resume(cfg.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_run_config(cfg, out, step=loop.state.global_step)
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    if loop.state.step == 0:
        validate(0)
    data.start(loop.micro_steps().start)

    # 3. Loop: the shared GAN step (distill/training/gan_step.py: G phase, D phase + lazy R1) on real samples; EMA,
    # logs, checkpoints, sample grids.
    view = RealImagesView(
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=unwrap_d,
        noise_shape=noise_shape,
        mismatch=cfg.mismatch_weight > 0,
        clip_guidance=parts.clip_guidance,
        clip_weight=cfg.clip_guidance_weight,
        to_images=parts.to_images,
        mode_seeking_weight=cfg.mode_seeking_weight,
    )
    engine = GANStep(
        loop,
        view=view,
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=unwrap_d,
        opt_g=opt_g,
        opt_d=opt_d,
        loss=cfg.loss,
        mismatch_weight=cfg.mismatch_weight,
        r1_gamma=cfg.r1_gamma,
        r1_interval=cfg.r1_interval,
        max_grad_norm=cfg.max_grad_norm,
        lr_warmup_steps=cfg.lr_warmup_steps,
    )
    with loop.progress():
        while not loop.done:
            view.blur_sigma = blur_sigma(nimg=loop.state.nimg, init_sigma=cfg.blur_sigma, fade_kimg=cfg.blur_fade_kimg)
            engine.run([data.batch(micro) for micro in loop.micro_steps()], extra={"blur_sigma": view.blur_sigma})

    # 4. Save: the EMA generator as a pipeline.
    if accelerator.is_main_process:
        loop.export_final(out / "pipeline")
        accelerator.print(
            f"done: {loop.state.step} steps, {loop.state.nimg} images; one-step pipeline in "
            f"{(out / 'pipeline').resolve()}"
        )


if __name__ == "__main__":
    main()
