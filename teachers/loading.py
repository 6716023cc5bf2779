"""Load a diffusers Stable Diffusion family teacher by hub id or local folder.

Supported: ``StableDiffusionPipeline`` (SD1.x, SD2.x with epsilon or v-prediction),
``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings, added time ids) and
``StableDiffusion3Pipeline`` (SD3 / SD3.5: an MMDiT transformer on a rectified-flow ODE, two CLIP
encoders and an optional T5). FLUX is not supported yet (docs/flow-matching-teachers.md).
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
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
FLOW_FAMILIES = ("sd3",)  # rectified-flow teachers: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts eps - x0

# Deterministic probability-flow ODE solvers (no noise injected after the initial latent). flow_euler is
# the flow-matching teachers' own Euler solver; from_config keeps their shift / dynamic-shift settings.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": False}),
}
FLOW_SCHEDULERS = ("flow_euler",)
# `scheduler: auto`: the family's default solver (what the configs of each family use).
DEFAULT_SCHEDULERS = {"sd": "ddim", "sdxl": "ddim", "sd3": "flow_euler"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def vae_scale_factor(vae) -> int:
    """Image pixels per latent cell: 2 per VAE down-block after the first. students/pipeline.py has the same
    formula: teachers/ and students/ do not import each other."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class Teacher:
    """A loaded teacher pipeline plus the facts the rest of the toolkit needs about it."""

    pipe: DiffusionPipeline
    family: str  # "sd", "sdxl" or "sd3"
    name_or_path: str
    revision: str | None

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.pipe.vae)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the ODE evaluates: the UNet (SD, SDXL) or the MMDiT transformer (SD3)."""
        return self.pipe.transformer if self.family in FLOW_FAMILIES else self.pipe.unet

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def sample_size(self) -> int:
        """The denoiser's default latent side."""
        return int(self.denoiser.config.sample_size)

    @property
    def prediction_type(self) -> str:
        if self.family in FLOW_FAMILIES:
            return "flow_matching"  # v = eps - x0 (SD3 paper, Esser et al. 2024, §2)
        return str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    def latent_convention(self) -> dict:
        """How the pairs' latents relate to the VAE: what the pipeline returns with ``output_type="latent"``.

        Every family's pipeline returns ``(vae.encode(x) - shift_factor) * scaling_factor`` (SD1/2/XL: no
        shift) and decodes ``latents / scaling_factor + shift_factor``; the manifest records both factors."""
        cfg = self.pipe.vae.config
        return {
            "space": "vae-scaled: latents = (vae.encode(image).latent_dist - shift_factor) * scaling_factor; "
            "image = vae.decode(latents / scaling_factor + shift_factor)",
            "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
        }

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latent for a square ``resolution``; checks divisibility."""
        f = self.vae_scale_factor
        if resolution <= 0 or resolution % f:
            lo, hi = (resolution // f) * f, (resolution // f + 1) * f
            raise ValueError(
                f"resolution {resolution} is not divisible by the VAE factor {f}: use a multiple of {f} (e.g. "
                f"{lo or hi} or {hi})"
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
            raise FileNotFoundError(
                f"{path} is not a diffusers pipeline folder (no model_index.json): pass a pipeline saved with "
                "save_pretrained"
            )
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


def pipeline_family(name_or_path: str, *, revision: str | None = None) -> str:
    """``sd``, ``sdxl`` or ``sd3`` from the teacher's ``model_index.json`` (no weights are loaded)."""
    return _family(_model_index(name_or_path, revision)[0], name_or_path)


def _family(index: dict, name_or_path: str) -> str:
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"teacher {name_or_path!r} is a {cls_name}, which is not supported; supported pipelines: "
            f"{', '.join(SUPPORTED_PIPELINES)} (SD1.x, SD2.x, SDXL, SD3 / SD3.5)"
        )
    return SUPPORTED_PIPELINES[cls_name]


def resolve_scheduler(name: str, *, family: str) -> str:
    """The solver name for ``family``: ``auto`` becomes the family's default; a solver of the other ODE kind is
    refused."""
    if name == "auto":
        return DEFAULT_SCHEDULERS[family]
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of auto, {', '.join(SCHEDULERS)}")
    flow = family in FLOW_FAMILIES
    if flow != (name in FLOW_SCHEDULERS):
        fits = [n for n in SCHEDULERS if (n in FLOW_SCHEDULERS) == flow]
        kind = "a flow-matching" if flow else "a diffusion (noise-prediction)"
        raise ValueError(
            f"scheduler {name!r} cannot solve {kind} teacher's ODE ({family}): use {' or '.join(fits)} (or auto)"
        )
    return name


def sd3_default_max_sequence_length() -> int:
    """``StableDiffusion3Pipeline.__call__``'s default T5 length (read from its signature, not restated)."""
    import inspect

    return int(inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default)


def load_components(
    name_or_path: str, names: tuple[str, ...], *, revision: str | None = None, what: str = "pipeline"
) -> dict:
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
            raise ValueError(
                f"{what} {name_or_path!r}: {name} has only {len(component)} tokens (vocabulary files missing?); "
                "re-download the pipeline with its tokenizer folder"
            )
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
    scheduler: str = "auto",
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher pipeline (hub id or folder) in ``torch_dtype`` on ``device``, with ``scheduler``
    (``auto``: ddim for SD / SDXL, flow_euler for SD3). An SD3 folder saved without T5 loads T5-less."""
    if not name_or_path:
        raise ValueError(
            "no teacher given: set `teacher` to a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a "
            "local folder"
        )
    if scheduler != "auto" and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of auto, {', '.join(SCHEDULERS)}")
    index, _ = _model_index(name_or_path, revision)
    family = _family(index, name_or_path)
    scheduler = resolve_scheduler(scheduler, family=family)
    kwargs = dict(dtype=torch_dtype, revision=revision, variant=variant)
    if family == "sd":
        # Pairs are latents: the safety checker would only cost memory and a download.
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, **kwargs)
    else:
        # T5 is optional in SD3 but not one of the pipeline's _optional_components: a folder saved without
        # it loads only when told so (and SD3 then feeds zeros where the T5 tokens would be).
        no_t5 = (index.get("text_encoder_3") or [None])[0] is None
        pipe = StableDiffusion3Pipeline.from_pretrained(
            name_or_path, **(dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}), **kwargs
        )
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
