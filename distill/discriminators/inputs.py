"""What every from-scratch discriminator does to its input and its text before its own layers.

- ``blur``: a Gaussian blur whose sigma fades linearly to zero over the first images of training
  (StyleGAN3 §B / StyleGAN-T's training setup: early on, D cannot win on high frequencies the young
  generator cannot make yet); :func:`blur_sigma` gives the sigma after ``nimg`` images.
- :class:`TextPooling`: the prompt tokens [N,L,D] (+ SDXL's pooled embedding) -> one text vector [N,T]
  for projection conditioning (Miyato & Koyama 2018; StyleGAN-T Fig. 3c, GigaGAN §3.3). The SD
  conditioning carries no pooled CLIP embedding for SD1.x / 2.x, so a learned query attends over the
  tokens instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def blur_sigma(*, nimg: int, init_sigma: float, fade_kimg: float) -> float:
    """The blur after ``nimg`` images: ``init_sigma`` fading linearly to 0 at ``fade_kimg`` thousand images."""
    if init_sigma <= 0 or fade_kimg <= 0:
        return 0.0
    return max(0.0, 1.0 - nimg / (fade_kimg * 1000.0)) * init_sigma


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [N,C,H,W] with ``sigma`` pixels (identity for sigma <= 0); differentiable."""
    if sigma <= 0:
        return x
    import kornia

    radius = min(int(math.ceil(3 * sigma)), (min(x.shape[-2:]) - 1) // 2)
    if radius < 1:
        return x
    return kornia.filters.gaussian_blur2d(x, (2 * radius + 1, 2 * radius + 1), (sigma, sigma), border_type="reflect")


class TextPooling(nn.Module):
    """``forward(prompt_embeds [N,L,D], pooled [N,P] | None) -> [N,out_dim]``: a learned query attends over the
    tokens (nn.MultiheadAttention), a linear maps the result (+ the pooled embedding) to ``out_dim``."""

    def __init__(self, context_dim: int, out_dim: int, *, pooled_dim: int = 0, heads: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) / math.sqrt(context_dim))
        self.attn = nn.MultiheadAttention(context_dim, heads, batch_first=True)
        self.proj = nn.Linear(context_dim + pooled_dim, out_dim)
        self.pooled_dim = pooled_dim

    def forward(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        q = self.query.expand(prompt_embeds.shape[0], -1, -1).to(prompt_embeds.dtype)
        t = self.attn(q, prompt_embeds, prompt_embeds, need_weights=False)[0][:, 0]  # [N,D]
        if self.pooled_dim:
            if pooled is None:
                raise ValueError(
                    f"this discriminator was built with pooled_dim={self.pooled_dim}: pass SDXL's pooled "
                    "text embedding (added_cond_kwargs['text_embeds'])"
                )
            t = torch.cat([t, pooled.to(t.dtype)], dim=1)
        return self.proj(t)


def pooled_embeds(added_cond_kwargs: dict | None) -> torch.Tensor | None:
    return (added_cond_kwargs or {}).get("text_embeds")
