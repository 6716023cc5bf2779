"""The digits teacher in SD3 form: a tiny rectified-flow MMDiT as a ``StableDiffusion3Pipeline``.

The same testbed as ``teachers/digits.py`` (32 px digits), with SD3's component classes: an
``SD3Transformer2DModel`` (joint attention over image patches and text tokens, AdaLN from the pooled
text), two ``CLIPTextModelWithProjection`` encoders over the real CLIP vocabulary and no T5 (SD3 then
feeds zeros in its place), ``FlowMatchEulerDiscreteScheduler`` and an ``AutoencoderKL`` with SD3's
``shift_factor``. The VAE is the committed digits VAE (4 x 16 x 16 latents, shift 0): both digits
teachers share one latent space, so the digits E-LatentLPIPS network and classifier serve both.
Everything that loads an SD3 pipeline folder loads this one.
"""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from teachers.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer


def load_digits_vae(path: str | os.PathLike, *, shift_factor: float = 0.0) -> AutoencoderKL:
    """The digits teacher's VAE (``path``: its pipeline folder) with SD3's ``shift_factor`` set: the SD3
    pipeline decodes ``latents / scaling_factor + shift_factor`` and needs a number there (SD1's is None)."""
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    vae.register_to_config(shift_factor=float(shift_factor))
    return vae.eval()


def build_text_encoder(
    *,
    hidden_size: int,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    max_position_embeddings: int = 16,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModelWithProjection:
    """A narrow CLIP text encoder with a projection (SD3 reads its pooled projection) over the full CLIP
    vocabulary, so the real tokenizer fits; the 49,408-token embedding is most of its size."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer(
    *,
    latent_channels: int = 4,
    sample_size: int = 16,
    num_layers: int = 4,
    attention_head_dim: int = 32,
    num_attention_heads: int = 2,
    joint_attention_dim: int,
    pooled_projection_dim: int,
) -> SD3Transformer2DModel:
    """A small MMDiT: 2x2 patches of the 16x16 latent (64 image tokens), joint attention with the text tokens."""
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=attention_head_dim * num_attention_heads,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=sample_size,  # patch grids up to twice the default side (64 px images)
    )


def build_scheduler(*, shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3's sampler. Its timestep shift grows with resolution (SD3 paper §5.3.2: 3.0 at 1024 px); 32 px
    digits need none."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def assemble_pipeline(
    *,
    vae: AutoencoderKL,
    transformer: SD3Transformer2DModel,
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer | None = None,
    shift: float = 1.0,
) -> StableDiffusion3Pipeline:
    """The components as a T5-less ``StableDiffusion3Pipeline`` (one CLIP tokenizer shared by both encoders,
    as the pipeline pads both to the first one's length anyway)."""
    if tokenizer is None:
        tokenizer = build_clip_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_scheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
