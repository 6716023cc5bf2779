"""Prompt -> text conditioning, exactly as SD1.x/2.x and SDXL pipelines encode it.

The one-step pipeline has no ``unet`` component, so diffusers' ``encode_prompt`` methods (which read
``self.unet``) cannot be reused on it; these few lines reproduce their no-CFG path and a test checks
them against ``StableDiffusionPipeline.encode_prompt`` / ``StableDiffusionXLPipeline.encode_prompt``.
Training encodes prompts with the same function, so train and sample conditioning cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    prompt_embeds: torch.Tensor  # [N,L,D] cross-attention context
    pooled_prompt_embeds: torch.Tensor | None = None  # [N,P] SDXL only
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
    return TextConditioning(embeds, pooled, sdxl_time_ids(resolution, batch=len(prompts), dtype=embeds.dtype, device=device))


def sdxl_time_ids(resolution: tuple[int, int], *, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's added time ids [N,6]: (original_size, crop top-left, target_size) as its pipelines use by default."""
    h, w = resolution
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).repeat(batch, 1)
