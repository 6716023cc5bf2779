"""Frozen pretrained networks by name, loaded one way for every room that needs them: the VAE (from-scratch
GAN, latent caching, latent-LPIPS training) and open_clip models (CLIP score, CLIP guidance, the projected
discriminator's CLIP features). Weights absent offline fail fast with the one-line fix."""

from __future__ import annotations

from pathlib import Path

import torch


def load_vae(vae: str, *, subfolder: str | None):
    """Frozen AutoencoderKL from a diffusers path or Hub id (``subfolder`` None, empty or ``.``: the root)."""
    from diffusers import AutoencoderKL

    if not vae:
        raise ValueError(
            "set `vae` to a diffusers model path or Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    model = AutoencoderKL.from_pretrained(vae, subfolder=None if subfolder in (None, "", ".") else subfolder)
    return model.eval().requires_grad_(False)


def resolve_clip_weights(model_name: str, pretrained: str, cache_dir: str | None) -> str:
    """A local weights file for (model, tag): cached or downloaded as open_clip does; offline and absent, a one-line
    fix."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    if Path(pretrained).is_file():
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(
            f"open_clip has no pretrained tag {pretrained!r} for {model_name} (tags: {tags}); or pass a weights file "
            "path"
        )
    source = cfg.get("hf_hub") or cfg.get("url", "")
    repo = cfg.get("hf_hub", "").rstrip("/")
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # offline: huggingface_hub / urllib raise many types
        where = (
            f"`hf download {repo}` (Hugging Face cache; then run with HF_HUB_OFFLINE=1)"
            if repo
            else f"a download of {source}"
        )
        raise FileNotFoundError(
            f"the open_clip weights {model_name} / {pretrained} (CLIP score, CLIP guidance or CLIP features) are not "
            "available locally "
            f"({type(exc).__name__}): get them with {where}, or put the weights file anywhere and set "
            f"clip_pretrained=/path/to/open_clip_pytorch_model.bin"
        ) from None


def load_open_clip(
    model_name: str, pretrained: str | None, *, cache_dir: str | None = None, device="cpu", transforms: bool = False
):
    """An open_clip model by name and pretrained tag or local file (``None``: random weights). The file is
    resolved before the model is built: building ViT-g-14 (1.4B parameters) only to fail on the download is
    minutes lost. ``transforms``: also return its evaluation preprocessing, ``(model, preprocess)``."""
    import open_clip

    weights = None if pretrained is None else resolve_clip_weights(model_name, pretrained, cache_dir)
    if transforms:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
        return model, preprocess
    return open_clip.create_model(model_name, pretrained=weights, device=device)


def random_tiny_open_clip(seed: int = 0, *, device: str | torch.device = "cpu"):
    """FOR TESTS ONLY: an open_clip ViT with random weights (32 px, 1 layer), ``(model, preprocess, tokenizer)``."""
    import open_clip
    from open_clip.model import CLIP
    from open_clip.transform import image_transform

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=16,
            vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        )
    return model.to(device).eval(), image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")
