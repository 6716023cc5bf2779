"""Prompt -> text conditioning, exactly as SD1.x/2.x, SDXL and SD3 pipelines encode it.

The one-step pipeline has no ``unet`` / ``transformer`` component, so diffusers' ``encode_prompt`` methods
(which read them) cannot be reused on it; these few lines reproduce their no-CFG path and tests check
them against ``StableDiffusionPipeline.encode_prompt`` / ``StableDiffusionXLPipeline.encode_prompt`` /
``StableDiffusion3Pipeline.encode_prompt``.
Training encodes prompts with the same function, so train and sample conditioning cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    prompt_embeds: torch.Tensor  # [N,L,D] cross-attention context
    pooled_prompt_embeds: torch.Tensor | None = None  # [N,P] SDXL and SD3
    time_ids: torch.Tensor | None = None  # [N,6] SDXL only: original size, crop, target size

    def added_cond_kwargs(self) -> dict | None:
        if self.pooled_prompt_embeds is None:
            return None
        return {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}

    def index(self, idx) -> "TextConditioning":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TextConditioning(self.prompt_embeds[idx], pick(self.pooled_prompt_embeds), pick(self.time_ids))

    def to(self, *args, **kwargs) -> "TextConditioning":
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return TextConditioning(move(self.prompt_embeds), move(self.pooled_prompt_embeds), move(self.time_ids))


def _ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_text(
    prompts: list[str],
    *,
    tokenizer,
    text_encoder,
    tokenizer_2=None,
    text_encoder_2=None,
    resolution: tuple[int, int] | None = None,
) -> TextConditioning:
    """Encode ``prompts`` with one (SD) or two (SDXL) CLIP encoders; ``resolution`` (h, w) for SDXL time ids."""
    device = text_encoder.device
    if text_encoder_2 is None:
        embeds = text_encoder(_ids(tokenizer, prompts, device))[0]
        return TextConditioning(embeds)
    # SDXL: penultimate hidden states of both encoders, concatenated; pooled output of the second.
    out_1 = text_encoder(_ids(tokenizer, prompts, device), output_hidden_states=True)
    out_2 = text_encoder_2(_ids(tokenizer_2, prompts, text_encoder_2.device), output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2].to(device)], dim=-1)
    pooled = out_2[0].to(device)
    if resolution is None:
        raise ValueError("SDXL conditioning needs the output resolution for its time ids")
    return TextConditioning(
        embeds, pooled, sdxl_time_ids(resolution, batch=len(prompts), dtype=embeds.dtype, device=device)
    )


def encode_sd3_text(
    prompts: list[str],
    *,
    tokenizer,
    text_encoder,
    tokenizer_2,
    text_encoder_2,
    tokenizer_3=None,
    text_encoder_3=None,
    max_sequence_length: int = 256,
    joint_attention_dim: int | None = None,
) -> TextConditioning:
    """SD3's conditioning (``StableDiffusion3Pipeline.encode_prompt`` without CFG, clip_skip or LoRA scale):
    the penultimate hidden states of both CLIP encoders concatenated and zero-padded to the T5 width, then
    the T5 tokens appended along the sequence (``max_sequence_length`` of them; without T5, zeros of width
    ``joint_attention_dim``, the transformer's); pooled = both CLIP projections concatenated. -> ``[N,77+L,D]``,
    ``[N,P]``.

    Differentiable in the encoders' weights when grad is on (the SD3 digits teacher trains its encoders through
    it, so its training and its pipeline encode prompts alike); frozen encoders build no graph."""
    device, dtype = text_encoder.device, text_encoder.dtype
    clip, pooled = [], []
    for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        # Both CLIP tokenizers pad to the first one's length, as the pipeline's tokenizer_max_length does.
        ids = tok(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        pooled.append(out[0].to(device))
        clip.append(out.hidden_states[-2].to(dtype=dtype, device=device))
    clip_embeds = torch.cat(clip, dim=-1)
    if text_encoder_3 is None:
        if joint_attention_dim is None:
            raise ValueError(
                "SD3 conditioning without T5 needs joint_attention_dim (the transformer's) for its zero tokens"
            )
        t5 = torch.zeros((len(prompts), max_sequence_length, joint_attention_dim), device=device, dtype=dtype)
    else:
        ids = tokenizer_3(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5 = text_encoder_3(ids.to(text_encoder_3.device))[0].to(dtype=text_encoder_3.dtype, device=device)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
    return TextConditioning(torch.cat([clip_embeds, t5], dim=-2), torch.cat(pooled, dim=-1))


def sdxl_time_ids(resolution: tuple[int, int], *, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's added time ids [N,6]: (original_size, crop top-left, target_size) as its pipelines use by default."""
    h, w = resolution
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).repeat(batch, 1)
