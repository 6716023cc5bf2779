"""The digits teacher: a tiny text-to-image latent diffusion model in Stable Diffusion's form.

Same component classes as SD1.x (AutoencoderKL, UNet2DConditionModel, CLIPTextModel + the real CLIP
tokenizer, DDIM), only small: 32 px images -> 4x16x16 latents, a 3-level UNet with cross-attention
at 8x8 and 4x4 only (at 16x16 it costs 2-4x the step time for no gain on digits). Everything that
loads an SD pipeline folder loads this one, so the whole toolkit runs on it offline.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from teachers.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

# SD1.x's noise schedule; the DDIM sampler and the DDPM training noise share it.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def build_vae(
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    latent_channels: int = 4,
    sample_size: int = 32,
    mid_block_add_attention: bool = False,
) -> AutoencoderKL:
    """AutoencoderKL downsampling by 2**(len(block_out_channels)-1): (32, 64) maps 3x32x32 -> 4x16x16.

    The mid-block attention is off by default: it costs ~40 % of a training step for digits.
    """
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, block_out_channels[0]),
        sample_size=sample_size,
        mid_block_add_attention=mid_block_add_attention,
        scaling_factor=1.0,  # set from the trained encoder's latent std before saving
    )


def build_unet(
    *,
    block_out_channels: tuple[int, ...] = (32, 64, 128),
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    latent_channels: int = 4,
    sample_size: int = 16,
    pooled_text_embedding: bool = True,
) -> UNet2DConditionModel:
    """SD-style UNet; the first (highest-resolution) level has no attention, the others cross-attend.

    ``pooled_text_embedding`` adds an attention-pooled summary of the prompt to the timestep
    embedding (diffusers' ``addition_embed_type="text"``), so every ResNet block sees the prompt:
    with cross-attention alone a small UNet learns digit shapes long before it follows the prompt.
    It is a config option of the standard UNet, so the pipeline needs nothing extra.
    """
    n = len(block_out_channels)
    extra = (
        dict(addition_embed_type="text", addition_embed_type_num_heads=max(1, cross_attention_dim // 16))
        if pooled_text_embedding
        else {}
    )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=min(32, block_out_channels[0]),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        **extra,
    )


def build_text_encoder(
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    max_position_embeddings: int = 77,
) -> CLIPTextModel:
    """A small CLIPTextModel over the full CLIP vocabulary (49,408 tokens), so the real tokenizer fits.

    The token embedding dominates the size (49,408 x hidden_size), hence the narrow default width.
    """
    tok_ids = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # CLIP's special tokens
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="quick_gelu",
        **tok_ids,
    )
    return CLIPTextModel(config)


def build_train_scheduler() -> DDPMScheduler:
    """The forward (noising) process used in training."""
    return DDPMScheduler(**SCHEDULE)


def build_sample_scheduler() -> DDIMScheduler:
    """The sampler stored in the pipeline (SD1.x's DDIM settings)."""
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(
    *,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer | None = None,
) -> StableDiffusionPipeline:
    """Wrap trained components into a StableDiffusionPipeline (no safety checker).

    ``tokenizer`` defaults to a freshly built CLIP tokenizer (a second or two to build).
    """
    if tokenizer is None:
        tokenizer = build_clip_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def save_pipeline(*, pipeline, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a digits teacher's pipeline folder (safetensors); ``from_pretrained(path)`` of its pipeline class
    loads it (the SD3 form: see :func:`teachers.digits_sd3.assemble_pipeline`).

    ``dtype`` (e.g. float16, to halve the folder) applies to the denoiser (UNet or transformer) and VAE
    only: diffusers loads them back as float32 unless asked otherwise, while transformers would load a
    float16 text encoder as float16 and break float32 pipelines. ``pipeline`` itself is left unchanged.
    """
    path = Path(path)
    if dtype is not None:
        pipeline = copy.deepcopy(pipeline)
        for name in ("unet", "transformer", "vae"):
            if getattr(pipeline, name, None) is not None:
                getattr(pipeline, name).to(dtype=dtype)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
