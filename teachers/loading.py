"""Load a diffusers Stable Diffusion family teacher by hub id or local folder.

Supported: ``StableDiffusionPipeline`` (SD1.x, SD2.x with epsilon or v-prediction) and
``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings, added time ids). Flow-matching
teachers (SD3, FLUX) need their own sampler and come later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}

# Deterministic probability-flow ODE solvers (no noise injected after the initial latent).
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



def vae_scale_factor(vae) -> int:
    """Image pixels per latent cell: 2 per VAE down-block after the first. students/pipeline.py has the same
    formula: teachers/ and students/ do not import each other."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class Teacher:
    """A loaded teacher pipeline plus the facts the rest of the toolkit needs about it."""

    pipe: DiffusionPipeline
    family: str  # "sd" or "sdxl"
    name_or_path: str
    revision: str | None

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.pipe.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    @property
    def prediction_type(self) -> str:
        return str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latent for a square ``resolution``; checks divisibility."""
        f = self.vae_scale_factor
        if resolution <= 0 or resolution % f:
            lo, hi = (resolution // f) * f, (resolution // f + 1) * f
            raise ValueError(
                f"resolution {resolution} is not divisible by the VAE factor {f}: use a multiple of {f} (e.g. {lo or hi} or {hi})"
            )
        side = resolution // f
        return (self.latent_channels, side, side)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _model_index(name_or_path: str, revision: str | None, what: str = "teacher") -> tuple[dict, bool]:
    """Read ``model_index.json`` from a folder or the hub; fail fast with one line if neither has it."""
    path = Path(name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json): pass a pipeline saved with save_pretrained")
        return json.loads(index.read_text()), True
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{what} {name_or_path!r} not found: no such pipeline folder")
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(name_or_path, "model_index.json", revision=revision)
    except Exception as exc:  # offline, unknown repo, gated, bad id: huggingface_hub has many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileNotFoundError(
            f"{what} {name_or_path!r} not found: not a local folder and not loadable from the Hugging Face Hub "
            f"({type(exc).__name__}: {reason[:160]}); pass a local pipeline folder, or download it first "
            f"(`hf download {name_or_path}`) and run with HF_HUB_OFFLINE=1"
        ) from None
    return json.loads(Path(index).read_text()), False


def load_components(name_or_path: str, names: tuple[str, ...], *, revision: str | None = None,
                    what: str = "pipeline") -> dict:
    """Some components of a diffusers pipeline (hub id or folder), loaded alone by the classes its
    ``model_index.json`` names, e.g. a teacher's text encoders and tokenizers for a trainer that needs no
    UNet. Absent components are None; models come frozen in eval mode."""
    import importlib

    index, _ = _model_index(name_or_path, revision, what=what)
    out = {}
    for name in names:
        library, cls_name = (index.get(name) or [None, None])[:2]
        if library is None or cls_name is None:
            out[name] = None
            continue
        cls = getattr(importlib.import_module(library), cls_name)
        component = cls.from_pretrained(name_or_path, subfolder=name, revision=revision)
        if isinstance(component, torch.nn.Module):
            component = component.eval().requires_grad_(False)
        elif name.startswith("tokenizer") and len(component) < 1000:
            # Offline, a hub tokenizer can silently come back with only its special tokens.
            raise ValueError(f"{what} {name_or_path!r}: {name} has only {len(component)} tokens (vocabulary files missing?); "
                             "re-download the pipeline with its tokenizer folder")
        out[name] = component
    return out


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Swap the pipeline's scheduler for a deterministic ODE solver built from its own config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def load_teacher(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher pipeline (hub id or folder) in ``torch_dtype`` on ``device``, with ``scheduler``."""
    if not name_or_path:
        raise ValueError("no teacher given: set `teacher` to a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local folder")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    index, _ = _model_index(name_or_path, revision)
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"teacher {name_or_path!r} is a {cls_name}, which is not supported; supported pipelines: "
            f"{', '.join(SUPPORTED_PIPELINES)} (SD1.x, SD2.x, SDXL)"
        )
    family = SUPPORTED_PIPELINES[cls_name]
    kwargs = dict(dtype=torch_dtype, revision=revision, variant=variant)
    if family == "sd":
        # Pairs are latents: the safety checker would only cost memory and a download.
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
        )
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, **kwargs)
    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, attr, None)
        # Offline, a hub tokenizer can silently come back with only its special tokens.
        if tok is not None and len(tok) < 1000:
            raise ValueError(
                f"teacher {name_or_path!r}: {attr} has only {len(tok)} tokens (vocabulary files missing?); "
                "re-download the pipeline with its tokenizer folder"
            )
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return Teacher(pipe=pipe, family=family, name_or_path=str(name_or_path), revision=revision)
