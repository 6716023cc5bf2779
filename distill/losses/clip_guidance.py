"""CLIP guidance of the generator (StyleGAN-T §3.3, after Crowson et al. 2022).

At every generator update the generated image goes through a frozen CLIP image encoder and the squared
spherical distance between its normalised embedding and the caption's is minimised:
``L_CLIP = arccos^2(c_image . c_text)``. It pulls samples towards images CLIP captions like their prompt,
the GAN counterpart of diffusion guidance; too much of it costs diversity (the paper's weight: 0.2).
Above 64 px the paper applies it to a random 64 px crop (``crop``); the crop is resized to CLIP's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPGuidance(nn.Module):
    """``forward(images [N,3,H,W] in [-1, 1], captions) -> [N] squared spherical distances`` (differentiable in the
    images). ``clip``: an open_clip model (``encode_image``, ``encode_text``), ``tokenizer``: captions -> tokens."""

    def __init__(self, clip, tokenizer, *, crop: int = 64):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.crop = crop
        size = clip.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        self._text: dict[str, torch.Tensor] = {}  # caption -> normalised embedding (the text tower is frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self._text})
        if new:
            emb = F.normalize(self.clip.encode_text(self.tokenizer(new).to(self.mean.device)).float(), dim=-1)
            self._text.update(zip(new, emb))
        return torch.stack([self._text[c] for c in captions])

    def forward(
        self, images: torch.Tensor, captions: list[str], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images
        if self.crop and x.shape[-1] > self.crop:  # one random crop per sample
            n, side = x.shape[0], x.shape[-1]
            top = torch.randint(0, side - self.crop + 1, (n,), generator=generator).tolist()
            left = torch.randint(0, side - self.crop + 1, (n,), generator=generator).tolist()
            x = torch.stack([x[i, :, t : t + self.crop, l : l + self.crop] for i, (t, l) in enumerate(zip(top, left))])
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        image = F.normalize(self.clip.encode_image(x).float(), dim=-1)
        cos = (image * self.text_embeddings(captions)).sum(dim=-1)
        return torch.arccos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).square()
