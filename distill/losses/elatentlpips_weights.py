"""The published E-LatentLPIPS checkpoints (Kang et al.; CC-BY-NC, an optional download, never bundled):
their VAE conventions, the key conversion to :class:`~distill.losses.elatentlpips.LatentLPIPSNet`, and
the Hub download. Loading our own ``save_pretrained`` folders also goes through :func:`load_latent_lpips`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .latent_lpips_net import LatentLPIPSNet


class PublishedNet(NamedTuple):
    """The VAE convention a published network was trained on (a tuple, so ``PUBLISHED[name][1]`` still works)."""

    latent_channels: int
    scaling_factor: float
    shift_factor: float


PUBLISHED = {
    "sd15": PublishedNet(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0),
    "sd21": PublishedNet(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0),
    "sdxl": PublishedNet(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0),
    "sd3": PublishedNet(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    "flux": PublishedNet(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
}
PUBLISHED_REPO = "Mingguksky/elatentlpips"
PUBLISHED_LICENSE = "CC-BY-NC-4.0 (non-commercial)"


@dataclass(frozen=True)
class FetchOptions:
    """How to get a published checkpoint: ``download`` is an explicit choice (the weights are CC-BY-NC);
    under multi-process launch ``is_main_process`` and ``barrier`` let only the main process download
    while the others wait and then read the cache."""

    download: bool = False
    cache_dir: str | os.PathLike | None = None
    is_main_process: Callable[[], bool] | None = None
    barrier: Callable[[], None] | None = None

    @classmethod
    def for_accelerator(cls, accelerator, *, download: bool = False) -> "FetchOptions":
        return cls(
            download=download,
            is_main_process=lambda: accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )


def published_filename(name: str) -> str:
    """Path of the calibrated (trunk + heads) checkpoint inside the published Hub repo."""
    return f"elatentlpips_ckpt/{name}_latest_vgg16_tuned.pth"


# torchvision vgg16_bn `features` indices at which the published net cuts its five stages.
_REF_SLICE_STARTS = (0, 7, 14, 24, 34)


def _ref_index_to_stage(idx: int) -> tuple[int, int]:
    stage = max(s for s, start in enumerate(_REF_SLICE_STARTS) if idx >= start)
    return stage, idx - _REF_SLICE_STARTS[stage]


def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Map a published ``elatentlpips`` state dict to :class:`LatentLPIPSNet` keys.

    Accepts the calibrated layout (``net.slice{k}.{i}.*``, ``lin{k}.model.1.weight`` /
    ``lins.{k}.model.1.weight``) and the trunk-only classifier layout (``[module.]model.features.{i}.*``,
    classifier keys dropped). Returns ``(state_dict, has_heads)``.
    """
    out: dict[str, torch.Tensor] = {}
    has_heads = False
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if m := re.fullmatch(r"net\.slice(\d)\.(\d+)\.(.+)", key):
            stage, pos = int(m.group(1)) - 1, int(m.group(2)) - _REF_SLICE_STARTS[int(m.group(1)) - 1]
            out[f"stages.{stage}.{pos}.{m.group(3)}"] = value
        elif m := re.fullmatch(r"model\.features\.(\d+)\.(.+)", key):
            stage, pos = _ref_index_to_stage(int(m.group(1)))
            out[f"stages.{stage}.{pos}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"lins?\.?(\d)\.model\.\d\.weight", key):
            out[f"heads.{int(m.group(1))}.weight"] = value  # lin{k} and lins.{k} are the same tensor
            has_heads = True
        elif key.startswith("model.classifier.") or key.startswith("augment."):
            continue  # classifier head of the trunk checkpoint / augmentation buffers: not part of the metric
        else:
            raise ValueError(f"unexpected key {key!r} in an E-LatentLPIPS checkpoint")
    return out, has_heads


def load_reference_checkpoint(path: str | os.PathLike, *, name: str | None = None) -> LatentLPIPSNet:
    """Build a :class:`LatentLPIPSNet` from a local published ``.pth`` / ``.pth.tar`` file.

    ``name`` (sd15/sd21/sdxl/sd3/flux) sets the VAE convention; otherwise it is read from the file name.
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E-LatentLPIPS checkpoint {path} not found")
    if name is None:
        name = next((n for n in PUBLISHED if path.name.startswith(n + "_")), None)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]  # trunk-only classifier checkpoint
    state, has_heads = convert_reference_state_dict(ckpt)
    channels = state["stages.0.0.weight"].shape[1]
    # An unknown file name: no recorded convention, so the identity scaling.
    convention = PUBLISHED.get(name) or PublishedNet(latent_channels=channels, scaling_factor=1.0, shift_factor=0.0)
    net = LatentLPIPSNet(
        latent_channels=channels, scaling_factor=convention.scaling_factor, shift_factor=convention.shift_factor
    )
    missing, unexpected = net.load_state_dict(state, strict=False)
    allowed_missing = set() if has_heads else {f"heads.{i}.weight" for i in range(len(net.heads))}
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"checkpoint {path} does not fit the latent VGG16-BN layout: missing {missing}, unexpected {unexpected}"
        )
    if has_heads and any((h.weight < 0).any() for h in net.heads):
        raise ValueError(f"checkpoint {path} has negative head weights; LPIPS heads must be non-negative")
    return net.eval()


def fetch_published(
    name: str,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    is_main_process: Callable[[], bool] | None = None,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Local path of the published checkpoint ``name``, from the Hugging Face cache (the keyword form of
    :func:`fetch_published_with`; the options are those of :class:`FetchOptions`)."""
    options = FetchOptions(download=download, cache_dir=cache_dir, is_main_process=is_main_process, barrier=barrier)
    return fetch_published_with(name, fetch=options)


def fetch_published_with(name: str, *, fetch: FetchOptions) -> Path:
    """Local path of the published checkpoint ``name``; downloads into the HF cache (never the working
    directory) only if ``fetch.download``, and then only on the main process."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown E-LatentLPIPS checkpoint {name!r}; published: {', '.join(PUBLISHED)}")
    from huggingface_hub import hf_hub_download

    def get(local_only: bool) -> Path:
        try:
            return Path(
                hf_hub_download(
                    PUBLISHED_REPO, published_filename(name), cache_dir=fetch.cache_dir, local_files_only=local_only
                )
            )
        except Exception as exc:  # offline / not cached / hub error: one actionable message
            hint = (
                "it is not in the Hugging Face cache; pass download=True (license: "
                f"{PUBLISHED_LICENSE}) or a local path to the .pth file"
                if local_only
                else "the download failed; download it manually and pass its local path"
            )
            raise OSError(
                f"E-LatentLPIPS checkpoint {name!r} ({PUBLISHED_REPO}/{published_filename(name)}): {hint} [{exc}]"
            ) from exc

    main = True if fetch.is_main_process is None else bool(fetch.is_main_process())
    error: Exception | None = None
    path: Path | None = None
    if main:
        try:
            path = get(local_only=not fetch.download)
        except Exception as exc:  # still reach the barrier so the other ranks do not hang
            error = exc
    if fetch.barrier is not None:
        fetch.barrier()
    if error is not None:
        raise error
    return path if path is not None else get(local_only=True)


def load_latent_lpips(name_or_path: str | os.PathLike, *, fetch: FetchOptions = FetchOptions()) -> LatentLPIPSNet:
    """Load a latent LPIPS network from: a ``save_pretrained`` directory (ours, safetensors), a local
    published ``.pth`` file, or a published name (sd15/sd21/sdxl/sd3/flux) via :func:`fetch_published_with`."""

    p = Path(name_or_path)
    if p.is_dir() and (p / LatentLPIPSNet.config_name).is_file():
        return LatentLPIPSNet.from_pretrained(p).eval()
    if p.is_file():
        return load_reference_checkpoint(p)
    if str(name_or_path) in PUBLISHED:
        name = str(name_or_path)
        return load_reference_checkpoint(fetch_published_with(name, fetch=fetch), name=name)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a save_pretrained directory, a checkpoint file, nor a published name "
        f"({', '.join(PUBLISHED)})"
    )
