"""CLIP score: mean cosine similarity between image and prompt embeddings (open_clip).

The SDXL comparison table (Diffusion2GAN Table 3, SDXL-Turbo) reports the raw cosine (e.g. 0.346)
with ViT-g-14 LAION-2B, not torchmetrics' ``100 * max(cos, 0)``. The model is injectable: anything with
``encode_image(pixels) -> [N,D]`` and ``encode_text(tokens) -> [N,D]``, plus the ``preprocess``
(PIL image -> ``[3,h,w]``) and ``tokenizer`` (list of str -> tokens) that go with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distill.metrics import TEST_ONLY

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s34b_b88k"


@dataclass
class ClipModel:
    """An open_clip-style model with its image preprocessing and tokenizer; ``model_id`` names the weights."""

    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_id: str


def load_clip(
    model_name: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """An open_clip model by name and pretrained tag (or local weights file); fails if the weights are absent."""
    import open_clip

    from distill.core.pretrained import load_open_clip

    model, preprocess = load_open_clip(
        model_name, pretrained, cache_dir=str(cache_dir) if cache_dir else None, device=device, transforms=True
    )
    model_id = f"open_clip/{model_name}/{pretrained if not Path(pretrained).is_file() else Path(pretrained).name}"
    return ClipModel(
        model=model.eval(), preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model_name), model_id=model_id
    )


def build_random_tiny_clip(seed: int = 0, *, device: str | torch.device = "cpu") -> ClipModel:
    """FOR TESTS ONLY: an open_clip ViT with random weights (32 px, 1 layer); its scores mean nothing."""
    from distill.core.pretrained import random_tiny_open_clip

    model, preprocess, tokenizer = random_tiny_open_clip(seed, device=device)
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer, model_id=f"random-tiny/seed{seed}")


def load_clip_model(name: str, pretrained: str, *, cache_dir=None, device="cpu") -> ClipModel:
    """Config front end: ``random-tiny`` (tests only) or an open_clip model name with its pretrained tag / file."""
    if name == TEST_ONLY:
        return build_random_tiny_clip(device=device)
    return load_clip(name, pretrained, cache_dir=cache_dir, device=device)


@torch.no_grad()
def clip_scores(
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    model: Any,
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-image cosine similarity ``[N]`` between ``images`` (PIL or ``[H,W,3]`` uint8) and their ``prompts``."""
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    scores = []
    for i in range(0, len(images), batch_size):
        batch = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images[i : i + batch_size]]
        pixels = torch.stack([preprocess(im) for im in batch]).to(device)  # [B,3,h,w]
        tokens = tokenizer(list(prompts[i : i + batch_size])).to(device)
        img = model.encode_image(pixels).float()
        txt = model.encode_text(tokens).float()
        scores.append(torch.nn.functional.cosine_similarity(img, txt, dim=-1).cpu())
    return torch.cat(scores)
