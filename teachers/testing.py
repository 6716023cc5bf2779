"""Random-weight teachers built from configs, saved as diffusers pipeline folders.

Real Stable Diffusion weights cannot be fetched on the machines this project is built on, so tests and
benchmarks build a teacher of the right *architecture* with random weights and load it through the
same ``load_teacher(path)`` call a user makes with a hub id. ``size="tiny"`` is for tests (seconds on
a CPU); ``size="full"`` uses the published SD1.5 / SD2.1 / SDXL / SD3-medium shapes for speed and memory
measurements on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .t5_tokenizer import build_t5_tokenizer
from .tokenizer import build_clip_tokenizer

# sd3: SD3 without T5 (text_encoder_3=None); sd3-t5: with a T5 encoder (and an offline-built T5 tokenizer).
FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "sd3-t5")


def _scheduler(prediction_type: str) -> DDIMScheduler:
    # The SD1.5/2.1/XL release scheduler settings.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def random_text_encoder(hidden: int, layers: int, heads: int, projection_dim: int | None = None, act="quick_gelu"):
    """A random-weight CLIP text encoder of the given shape (with a projection: ``CLIPTextModelWithProjection``,
    SDXL's second encoder); the published shapes give the published parameter counts."""
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def random_vae(
    size: str, scaling_factor: float, *, latent_channels: int = 4, shift_factor: float | None = None
) -> AutoencoderKL:
    """A random-weight ``AutoencoderKL``: ``tiny`` (factor 2, tests) or ``full`` (SD's shape, factor 8)."""
    if size == "tiny":
        # Two levels -> a VAE factor of 2, so a 32 px image is a Cx16x16 latent.
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _sd3_pipeline(size: str, *, t5: bool) -> StableDiffusion3Pipeline:
    """SD3: an MMDiT on 16-channel latents (VAE shift + scale), two CLIP encoders with projections (their
    pooled outputs concatenated), optionally T5, and the rectified-flow Euler sampler with shift 3."""
    tiny = size == "tiny"
    te1 = random_text_encoder(*((32, 2, 4) if tiny else (768, 12, 12)), projection_dim=32 if tiny else 768)
    te2 = random_text_encoder(
        *((32, 2, 4) if tiny else (1280, 32, 20)), projection_dim=32 if tiny else 1280, act="gelu"
    )
    joint_dim = 64 if tiny else 4096  # >= the two CLIP widths together: SD3 pads their concatenation to it
    transformer = SD3Transformer2DModel(
        sample_size=16 if tiny else 128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3 if tiny else 24,
        attention_head_dim=8 if tiny else 64,
        num_attention_heads=4 if tiny else 24,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32 if tiny else 1536,
        pooled_projection_dim=te1.config.projection_dim + te2.config.projection_dim,
        pos_embed_max_size=16 if tiny else 192,
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = build_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3) if tiny else 32128,
                d_model=joint_dim,
                d_kv=8 if tiny else 64,
                d_ff=64 if tiny else 10240,
                num_layers=2 if tiny else 24,
                num_heads=4 if tiny else 64,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    # SD3-medium's VAE factors; the sampler as released (FlowMatchEulerDiscreteScheduler, shift 3.0).
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=random_vae(size, 1.5305, latent_channels=16, shift_factor=0.0609),
        text_encoder=te1,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=te2,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_random_teacher(
    save_dir: str | os.PathLike,
    *,
    family: str = "sd15",
    size: str = "tiny",
    seed: int = 0,
) -> Path:
    """Build a random-weight SD-family pipeline (:func:`random_pipeline`) and ``save_pretrained`` it to ``save_dir``.

    family: ``sd15`` (epsilon, one CLIP encoder), ``sd2-v`` (v-prediction, SD2.x layout),
    ``sdxl`` (two encoders, pooled embeddings, added time ids), ``sd3`` (MMDiT, flow matching, two CLIP
    encoders, no T5: it reloads with ``from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``),
    ``sd3-t5`` (the same with a T5 encoder). Returns ``save_dir``.
    """
    torch.manual_seed(seed)
    save_dir = Path(save_dir)
    random_pipeline(family, size).save_pretrained(save_dir)
    return save_dir


def random_pipeline(family: str = "sd15", size: str = "tiny"):
    """The random-weight pipeline of :func:`build_random_teacher`, in memory (built under torch's FakeTensorMode or
    on the meta device it allocates no weights: the memory planner's full-size teachers)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in ("tiny", "full"):
        raise ValueError(f"unknown size {size!r}; choose 'tiny' or 'full'")
    tiny = size == "tiny"
    if family.startswith("sd3"):
        pipe = _sd3_pipeline(size, t5=family == "sd3-t5")
    elif family == "sdxl":
        te1 = random_text_encoder(*((32, 2, 4) if tiny else (768, 12, 12)))
        te2 = random_text_encoder(
            *((32, 2, 4) if tiny else (1280, 32, 20)), projection_dim=32 if tiny else 1280, act="gelu"
        )
        time_dim = 8 if tiny else 256
        pooled = te2.config.projection_dim
        unet_kwargs = (
            dict(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 1),
                norm_num_groups=8,
            )
            if tiny
            else dict(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280),
                layers_per_block=2,
                attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10),
            )
        )
        unet = UNet2DConditionModel(
            sample_size=16 if tiny else 128,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=te1.config.hidden_size + te2.config.hidden_size,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled,
            **unet_kwargs,
        )
        pipe = StableDiffusionXLPipeline(
            vae=random_vae(size, 0.13025),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=_scheduler("epsilon"),
            force_zeros_for_empty_prompt=True,
        )
    else:
        v = family == "sd2-v"
        te = random_text_encoder(
            *((32, 2, 4) if tiny else ((1024, 23, 16) if v else (768, 12, 12))), act="gelu" if v else "quick_gelu"
        )
        unet_kwargs = (
            dict(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                attention_head_dim=4,
                norm_num_groups=8,
            )
            if tiny
            else dict(
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                attention_head_dim=(5, 10, 20, 20) if v else 8,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=16 if tiny else (96 if v else 64),
            in_channels=4,
            out_channels=4,
            cross_attention_dim=te.config.hidden_size,
            use_linear_projection=v,
            **unet_kwargs,
        )
        pipe = StableDiffusionPipeline(
            vae=random_vae(size, 0.18215),
            text_encoder=te,
            tokenizer=build_clip_tokenizer(pad_token="!" if v else "<|endoftext|>"),
            unet=unet,
            scheduler=_scheduler("v_prediction" if v else "epsilon"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe
