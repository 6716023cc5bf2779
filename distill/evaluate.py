"""Evaluate a one-step student or a diffusion teacher: FID, precision/recall, diversity, CLIP score, fidelity to the
teacher, latency.

    accelerate launch distill/evaluate.py --config configs/eval/sd15_coco2014_30k.yaml [--key value ...]

Sample ``i`` is the pipeline's image for prompt ``i`` (prompts cycled) and noise drawn from (seed, i);
samples are made in fixed batches of consecutive indices, the batches split across processes, and each
PNG is cached in ``output_dir/samples``: the images, hence every number, are the same for any number of
processes, and re-running the same command after a kill only makes the missing batches. Metrics are
computed by the main process from the cached PNGs (8-bit, what a user would save). Writes
``metrics.json``, ``samples_grid.png`` and one ``name: value`` line per metric to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from data_gen.noise import noise_for_indices
from data_gen.prompts import load_labelled_prompts, load_prompts, prompt_for_index, prompts_fingerprint
from distill.core.config import (
    ConfigError,
    command,
    config_dict,
    package_versions,
    parse_config,
    require_non_negative,
    require_positive,
    save_config,
)
from distill.core.lock import locked
from distill.metrics import TEST_ONLY
from distill.metrics.fidelity import PIXEL_LPIPS_CHOICES, check_heldout, compute_fidelity, elatentlpips_name
from distill.metrics.generation import Sampler
from distill.metrics.sample_cache import check_samples_manifest, fill_sample_cache, folder_fingerprint, save_grid
from distill.metrics.sample_scores import compute_clip_score, compute_diversity, compute_fid, compute_precision_recall

# ------------------------------------------------------------------------------------------------
# The metrics: name -> function of the cached samples / the sampler (main process)


@dataclass
class MetricInputs:
    cfg: EvalConfig
    metrics: list[str]
    sampler: Sampler
    samples_dir: Path
    prompts: list[str]
    labels: list[int]
    latent_shape: tuple
    device: torch.device
    cache_dir: Path
    label_note: str = ""  # why `labels` is empty when diversity asked for them


def diversity_groups(prompts: list[str], labels: list[int], num_samples: int) -> tuple[list, str]:
    """Sample i's group for `diversity` and the grouping: its prompt's label when the prompts are labelled
    (every phrasing of a class together), else its prompt's text."""
    if labels:
        return [labels[i % len(labels)] for i in range(num_samples)], "label"
    return [prompt_for_index(prompts, i) for i in range(num_samples)], "prompt"


def feature_metrics(x: MetricInputs) -> tuple[dict, dict]:
    """fid, fid_to_teacher, precision_recall and diversity in one pass, in the feature space of `fid_extractor`:
    the extractor is loaded once, the samples' features extracted once for all of them, the real reference
    images' features once for precision/recall and diversity_real (before FID, which then reads their
    statistics from the cache)."""
    from distill.metrics.fid import reference_features
    from distill.metrics.image_io import folder_labels
    from distill.metrics.sample_scores import load_extractor, sample_features
    from teachers.digits_classifier import DigitClassifier  # the classifier folders FID can read (the testbed's)

    cfg = x.cfg
    common = dict(batch_size=cfg.metric_batch_size, num_workers=cfg.metric_workers, device=x.device)
    extractor = load_extractor(
        extractor_name=cfg.fid_extractor,
        device=x.device,
        cache_dir=x.cache_dir,
        load_classifier=DigitClassifier.from_pretrained,
    )
    features = sample_features(
        samples_dir=x.samples_dir, num_samples=cfg.num_samples, extractor=extractor, **common
    )  # [N,D]
    values, details = {}, {}

    reference_is_folder = bool(cfg.reference) and Path(cfg.reference).is_dir()
    real_diversity = "diversity" in x.metrics and bool(x.labels) and reference_is_folder
    real = real_labels = None
    if "precision_recall" in x.metrics or real_diversity:  # the same reference images and limit as fid
        real, files, real_info = reference_features(
            cfg.reference,
            extractor=extractor,
            cache_dir=x.cache_dir,
            limit=cfg.reference_limit,
            center_crop=cfg.reference_center_crop,
            **common,
        )
        if real_diversity:
            real_labels = folder_labels(cfg.reference, files, column=cfg.label_column)

    references = {}
    if "fid" in x.metrics:
        references["fid"] = dict(
            reference=cfg.reference, limit=cfg.reference_limit, center_crop=cfg.reference_center_crop
        )
    if "fid_to_teacher" in x.metrics:  # the teacher's own samples, as they are (same size and pipeline as ours)
        references["fid_to_teacher"] = dict(reference=cfg.teacher_reference, limit=cfg.num_samples, center_crop=False)
    if references:
        more, more_details = compute_fid(
            samples_dir=x.samples_dir,
            num_samples=cfg.num_samples,
            extractor_name=cfg.fid_extractor,
            references=references,
            cache_dir=x.cache_dir,
            extractor=extractor,
            features=features,
            **common,
        )
        values.update(more)
        details.update(more_details)
    if "precision_recall" in x.metrics:
        more, info = compute_precision_recall(features=features, real_features=real, k=cfg.pr_k, device=x.device)
        values.update(more)
        details["precision_recall"] = {
            **info,
            "reference": real_info["reference"],
            "set_sha256": real_info["set_sha256"],
            "extractor_id": extractor.extractor_id,
        }
    if "diversity" in x.metrics:
        groups, grouping = diversity_groups(x.prompts, x.labels, cfg.num_samples)
        if not x.labels:
            note = (
                f"the prompts have no `{cfg.label_column}` labels ({x.label_note}): samples grouped by prompt text; "
                "no real counterpart (diversity_real, diversity_ratio need labelled prompts and a labelled reference)"
            )
        elif not reference_is_folder:
            note = "no reference image folder: no real counterpart (diversity_real, diversity_ratio)"
        elif real_labels is None:
            note = (
                f"the reference {cfg.reference} has no metadata.jsonl with `file_name` and `{cfg.label_column}`: "
                "no real counterpart (diversity_real, diversity_ratio)"
            )
        else:
            note = ""
        more, info = compute_diversity(
            features=features,
            groups=groups,
            grouping=grouping,
            real_features=real if real_labels is not None else None,
            real_groups=real_labels,
            device=x.device,
            note=note,
        )
        values.update(more)
        details["diversity"] = {**info, "extractor_id": extractor.extractor_id}
    return values, details


def clip_score_metric(x: MetricInputs) -> tuple[dict, dict]:
    value, info = compute_clip_score(
        samples_dir=x.samples_dir,
        num_samples=x.cfg.num_samples,
        prompts=x.prompts,
        clip_model=x.cfg.clip_model,
        clip_pretrained=x.cfg.clip_pretrained,
        batch_size=x.cfg.metric_batch_size,
        device=x.device,
    )
    return {"clip_score": value}, {"clip_score": info}


def prompt_accuracy_metric(x: MetricInputs) -> tuple[dict, dict]:
    from distill.metrics.prompt_accuracy import prompt_accuracy
    from distill.metrics.sample_cache import read_samples
    from teachers.digits_classifier import DigitClassifier

    n = x.cfg.num_samples
    value, info = prompt_accuracy(
        list(read_samples(x.samples_dir, n)),
        [x.labels[i % len(x.labels)] for i in range(n)],
        classifier=DigitClassifier.from_pretrained(x.cfg.classifier),
        device=x.device,
    )
    return {"prompt_accuracy": value}, {"prompt_accuracy": info}


def fidelity_metric(x: MetricInputs) -> tuple[dict, dict]:
    cfg = x.cfg
    means, info = compute_fidelity(
        x.sampler,
        pairs=cfg.pairs,
        fidelity_start=cfg.fidelity_start,
        fidelity_count=cfg.fidelity_count,
        batch_size=cfg.batch_size,
        elatentlpips=cfg.elatentlpips,
        elatentlpips_download=cfg.elatentlpips_download,
        pixel_lpips=cfg.pixel_lpips,
        device=x.device,
    )
    return means, {"fidelity": info}


def compute_latency(cfg: EvalConfig, *, sampler: Sampler, prompts: list[str], latent_shape, device) -> dict:
    from distill.metrics.latency import measure_latency

    idx = list(range(cfg.latency_batch_size))
    noise, _ = noise_for_indices(seed=cfg.seed, indices=idx, shape=latent_shape)
    batch_prompts = [prompt_for_index(prompts, i) for i in idx] if prompts else ["a photo"] * len(idx)
    result = measure_latency(
        lambda: sampler.images(batch_prompts, noise),
        batch_size=cfg.latency_batch_size,
        warmup=cfg.latency_warmup,
        iterations=cfg.latency_iterations,
        min_seconds=cfg.latency_min_seconds,
        device=device,
    )
    return result.as_dict()


def latency_metric(x: MetricInputs) -> tuple[dict, dict]:
    info = compute_latency(x.cfg, sampler=x.sampler, prompts=x.prompts, latent_shape=x.latent_shape, device=x.device)
    return {k: info[k] for k in ("seconds_per_image", "images_per_second", "peak_memory_mb")}, {"latency": info}


class Metric(NamedTuple):
    compute: Callable[[MetricInputs], tuple[dict, dict]] | None  # -> (values, details); None: nothing to compute
    needs_samples: bool  # reads the cached samples (needs `prompts`)


# In the order the results are written; one function may serve several names (it runs once).
METRICS = {
    "fid": Metric(feature_metrics, needs_samples=True),
    "fid_to_teacher": Metric(feature_metrics, needs_samples=True),
    "precision_recall": Metric(feature_metrics, needs_samples=True),  # -> precision, recall
    "diversity": Metric(feature_metrics, needs_samples=True),  # -> diversity [, diversity_real, diversity_ratio]
    "clip_score": Metric(clip_score_metric, needs_samples=True),
    "prompt_accuracy": Metric(prompt_accuracy_metric, needs_samples=True),
    "fidelity": Metric(fidelity_metric, needs_samples=False),
    "latency": Metric(latency_metric, needs_samples=False),
    "samples": Metric(None, needs_samples=True),  # only generate and cache the samples
}
METRIC_GROUPS = tuple(METRICS)
SAMPLE_METRICS = tuple(name for name, metric in METRICS.items() if metric.needs_samples)
FEATURE_METRICS = tuple(
    name for name, metric in METRICS.items() if metric.compute is feature_metrics
)  # fid_extractor's


def compute_metrics(x: MetricInputs) -> tuple[dict[str, float], dict[str, dict]]:
    values: dict[str, float] = {}
    details: dict[str, dict] = {}
    done = set()
    for name, metric in METRICS.items():
        if name in x.metrics and metric.compute is not None and metric.compute not in done:
            done.add(metric.compute)
            more_values, more_details = metric.compute(x)
            values.update(more_values)
            details.update(more_details)
    return values, details


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvalConfig:
    pipeline: str = field(
        default="",
        metadata={"help": "OneStepGANPipeline folder, or a teacher (hub id / diffusers SD, SDXL or SD3 folder)"},
    )
    num_inference_steps: int = field(default=50, metadata={"help": "teacher only: ODE solver steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "teacher only: classifier-free guidance scale"})
    scheduler: str = field(
        default="ddim",
        metadata={"help": "teacher only: ddim, dpmpp or euler (SD / SDXL), flow_euler (SD3), or auto (the family's)"},
    )
    max_sequence_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "teacher only, SD3: T5 tokens (zero tokens without T5), as its pairs were made; unset: the "
            "pipeline's default"
        },
    )
    negative_prompt: str = field(default="", metadata={"help": "teacher only: negative prompt for CFG"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16"}
    )
    prompts: str = field(
        default="",
        metadata={
            "help": ".txt/.jsonl/.csv/.parquet file, a datasets name (e.g. COCO captions), or a pairs folder (with "
            "prompt_split train)"
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "column holding the caption in table / datasets sources"}
    )
    prompt_split: str = field(default="validation", metadata={"help": "split of a datasets prompt source"})
    num_samples: int = field(
        default=30000, metadata={"help": "images to generate for FID / CLIP score (prompts cycled)"}
    )
    resolution: int = field(default=0, metadata={"help": "image side in pixels (0: the pipeline's default)"})
    seed: int = field(default=0, metadata={"help": "sample i's noise comes from hash(seed, i)"})
    batch_size: int = field(
        default=8, metadata={"help": "images per generation call (the unit of caching and resumption)"}
    )
    output_dir: str = field(
        default="runs/eval", metadata={"help": "metrics.json, samples_grid.png and samples/ go here"}
    )
    metrics: str = field(
        default="fid,clip_score,fidelity,latency",
        metadata={
            "help": f"comma-separated subset of {', '.join(METRIC_GROUPS)} (precision_recall: precision and recall; "
            "diversity: diversity, and diversity_real, diversity_ratio with labels; samples: only generate "
            "and cache the samples)"
        },
    )
    reference: str = field(
        default="",
        metadata={
            "help": "FID reference: a folder of images, or an .npz with mu/sigma; precision_recall and "
            "diversity_real need the folder (diversity_real: with a metadata.jsonl of file_name and "
            "label_column)"
        },
    )
    reference_limit: int = field(
        default=0, metadata={"help": "use the first N reference images (sorted by path; 0: all)"}
    )
    reference_center_crop: bool = field(
        default=True, metadata={"help": "center-crop reference images to a square before resizing"}
    )
    teacher_reference: str = field(
        default="",
        metadata={
            "help": "fid_to_teacher: the teacher's samples drawn with another seed (the samples/ folder of an "
            "evaluate.py run on the teacher with a different `seed`)"
        },
    )
    fid_extractor: str = field(
        default="inception",
        metadata={
            "help": "inception (weights in metrics_cache), a path to inception-2015-12-05.pt, a classifier folder "
            f"(FID in its feature space), or {TEST_ONLY} (tests only); also the feature space of "
            "precision_recall and diversity"
        },
    )
    pr_k: int = field(
        default=3,
        metadata={"help": "precision_recall: k of the k-nearest-neighbour hyperspheres (Kynkäänniemi et al. 2019: 3)"},
    )
    clip_model: str = field(default="ViT-g-14", metadata={"help": f"open_clip model name, or {TEST_ONLY} (tests only)"})
    clip_pretrained: str = field(
        default="laion2b_s34b_b88k", metadata={"help": "open_clip pretrained tag or a local weights file"}
    )
    pairs: str = field(default="", metadata={"help": "pairs folder (generate_pairs.py) for the fidelity metrics"})
    fidelity_start: int = field(
        default=-1000, metadata={"help": "first held-out pair, by position in index order (negative: from the end)"}
    )
    fidelity_count: int = field(default=0, metadata={"help": "held-out pairs from fidelity_start (0: to the end)"})
    elatentlpips: str = field(
        default="auto",
        metadata={"help": f"auto (published sd15/sdxl by the VAE), a published name, a folder or .pth, or {TEST_ONLY}"},
    )
    elatentlpips_download: bool = field(
        default=False, metadata={"help": "download a published E-LatentLPIPS checkpoint (CC-BY-NC) into the HF cache"}
    )
    pixel_lpips: str = field(
        default="vgg",
        metadata={"help": f"lpips trunk: vgg or alex (torchvision weights), none (skip pixel LPIPS), or {TEST_ONLY}"},
    )
    latency_batch_size: int = field(default=1, metadata={"help": "images per timed call"})
    latency_warmup: int = field(default=3, metadata={"help": "untimed calls before timing"})
    latency_iterations: int = field(default=20, metadata={"help": "timed calls (at least; the median is reported)"})
    latency_min_seconds: float = field(
        default=0.0, metadata={"help": "keep timing until the timed calls add up to this"}
    )
    metric_workers: int = field(
        default=4, metadata={"help": "processes decoding and resizing images for FID (0: in the main process)"}
    )
    metric_batch_size: int = field(default=64, metadata={"help": "images per feature-extractor call"})
    metrics_cache: str = field(
        default="",
        metadata={
            "help": "Inception weights and reference statistics ($D2G_METRICS_HOME or ~/.cache/diffusion2gan/metrics)"
        },
    )
    classifier: str = field(
        default="", metadata={"help": "prompt_accuracy: a classifier folder (e.g. teachers/assets/digits-classifier)"}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "prompt_accuracy, diversity: column of the prompt table (and of the reference's metadata.jsonl) "
            "with each prompt's (image's) class"
        },
    )
    grid_size: int = field(default=16, metadata={"help": "first N samples in samples_grid.png (0: none)"})


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRIC_GROUPS]
    if bad or not names:
        raise ConfigError(
            f"unknown metric(s) {', '.join(map(repr, bad)) or '(none given)'} in `metrics`; choose from "
            f"{', '.join(METRIC_GROUPS)}"
        )
    return names


def validate(cfg: EvalConfig) -> list[str]:
    if not cfg.pipeline:
        raise ConfigError("no pipeline given: set `pipeline` to a OneStepGANPipeline folder or a teacher")
    require_positive(
        cfg,
        "num_samples",
        "batch_size",
        "latency_batch_size",
        "latency_iterations",
        "metric_batch_size",
        "num_inference_steps",
        "pr_k",
    )
    require_non_negative(cfg, "guidance_scale")
    if (
        min(
            cfg.resolution,
            cfg.latency_warmup,
            cfg.latency_min_seconds,
            cfg.grid_size,
            cfg.reference_limit,
            cfg.metric_workers,
        )
        < 0
    ):
        raise ConfigError(
            "resolution, latency_warmup, latency_min_seconds, grid_size, reference_limit and metric_workers must not "
            "be negative"
        )
    metrics = parse_metrics(cfg.metrics)
    if "fid" in metrics and not cfg.reference:
        raise ConfigError(
            "FID needs `reference`: a folder of reference images (e.g. COCO val) or an .npz statistics file"
        )
    if "precision_recall" in metrics:
        if not (cfg.reference and Path(cfg.reference).is_dir()):  # Path("") is "."
            raise ConfigError(
                f"precision_recall needs `reference`, a folder of real images (the k-NN manifolds need the "
                f"points, not an .npz of statistics; got {cfg.reference!r})"
            )
        if cfg.num_samples <= cfg.pr_k:
            raise ConfigError(
                f"precision_recall needs more than pr_k={cfg.pr_k} samples, got num_samples={cfg.num_samples}"
            )
    if "fid_to_teacher" in metrics and not (
        cfg.teacher_reference and Path(cfg.teacher_reference).is_dir()
    ):  # Path("") is "."
        raise ConfigError(
            f"fid_to_teacher needs `teacher_reference`, a folder of the teacher's samples drawn with another seed "
            f"(got {cfg.teacher_reference!r}): run this script on the teacher with --metrics samples --seed <other> "
            "first"
        )
    if "fidelity" in metrics:
        if not cfg.pairs:
            raise ConfigError("fidelity needs `pairs`: a pairs folder made by generate_pairs.py (use held-out rows)")
        if cfg.fidelity_count < 0:
            raise ConfigError(f"fidelity_count must not be negative, got {cfg.fidelity_count}")
        if cfg.pixel_lpips not in PIXEL_LPIPS_CHOICES:
            raise ConfigError(f"unknown pixel_lpips {cfg.pixel_lpips!r}; choose vgg, alex, none or {TEST_ONLY}")
        # Fidelity on rows the student trained on would flatter it: refuse them (before any model loads).
        check_heldout(
            pipeline=cfg.pipeline, pairs=cfg.pairs, fidelity_start=cfg.fidelity_start, fidelity_count=cfg.fidelity_count
        )
    if any(m in SAMPLE_METRICS for m in metrics) and not cfg.prompts:
        raise ConfigError(f"{', '.join(m for m in metrics if m in SAMPLE_METRICS)} need `prompts`")
    if "prompt_accuracy" in metrics and not Path(cfg.classifier, "config.json").is_file():
        raise ConfigError(
            f"prompt_accuracy needs `classifier`: a classifier folder with config.json (got {cfg.classifier!r})"
        )
    return metrics


# ------------------------------------------------------------------------------------------------
# Checks before generation, provenance


def warn_test_only(key: str) -> None:
    sys.stderr.write(f"warning: {key}={TEST_ONLY} uses random weights: for tests only, the numbers mean nothing\n")


def preflight(cfg: EvalConfig, metrics: list[str], *, sampler: Sampler, cache_dir: Path) -> None:
    """Fail before hours of generation when metric weights are missing (file checks only, no model build)."""
    if any(m in FEATURE_METRICS for m in metrics) and cfg.fid_extractor != TEST_ONLY:
        from distill.metrics.fid_features import inception_path, is_classifier_folder

        if not is_classifier_folder(cfg.fid_extractor):
            inception_path(cache_dir if cfg.fid_extractor == "inception" else cfg.fid_extractor)
    if "clip_score" in metrics and cfg.clip_model != TEST_ONLY:
        from distill.core.pretrained import resolve_clip_weights

        resolve_clip_weights(cfg.clip_model, cfg.clip_pretrained, None)
    if "fidelity" in metrics and sampler.pipe.vae is None:
        raise ConfigError("fidelity compares VAE latents to a teacher's: this pipeline works in pixel space (no VAE)")
    name = (
        elatentlpips_name(cfg.elatentlpips, vae_scaling_factor=sampler.pipe.vae.config.scaling_factor)
        if "fidelity" in metrics
        else ""
    )
    if "fidelity" in metrics and name != TEST_ONLY:
        from distill.losses.elatentlpips_weights import PUBLISHED, fetch_published

        if name in PUBLISHED:
            fetch_published(name, download=cfg.elatentlpips_download)
        elif not Path(name).exists():
            raise FileNotFoundError(
                f"elatentlpips {name!r} is neither a published name ({', '.join(PUBLISHED)}) nor an existing path"
            )
    if "fidelity" in metrics and cfg.pixel_lpips in ("vgg", "alex"):
        import torchvision

        weights = {"vgg": torchvision.models.VGG16_Weights, "alex": torchvision.models.AlexNet_Weights}[
            cfg.pixel_lpips
        ].IMAGENET1K_V1
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not file.is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":  # offline: torchvision would fail later
            raise FileNotFoundError(
                f"pixel LPIPS ({cfg.pixel_lpips}) needs torchvision's ImageNet weights: download {weights.url} to "
                f"{file}"
            )


def check_independent_reference(reference: Path, identity: dict) -> None:
    """fid_to_teacher compares two sample sets; drawn from the same noise they are coupled (a perfect
    student would score 0, below the teacher's own floor), so the reference must use another seed."""
    manifest = reference / "manifest.json"
    if not manifest.is_file():
        return  # a plain image folder: the caller vouches for it
    made = json.loads(manifest.read_text()).get("identity", {})
    if made.get("seed") == identity["seed"] and made.get("prompts_sha256") == identity["prompts_sha256"]:
        raise ConfigError(
            f"teacher_reference {reference} was drawn with this run's seed {identity['seed']} and prompts: the two "
            "sets "
            "would share their noise; make the reference with another --seed"
        )


def card_source(cfg: EvalConfig, metrics: list[str]) -> str:
    """One line for the model card: how its numbers were measured."""
    parts = [f"`distill/evaluate.py` ({', '.join(metrics)})"]
    if any(m in SAMPLE_METRICS for m in metrics):
        parts.append(f"{cfg.num_samples} samples of prompts `{cfg.prompts}`, seed {cfg.seed}")
    if "fid" in metrics or "precision_recall" in metrics:
        parts.append(f"FID reference `{cfg.reference}` ({cfg.fid_extractor})")
    elif "diversity" in metrics:
        parts.append(f"features of {cfg.fid_extractor}")
    if "fidelity" in metrics:
        parts.append(f"fidelity on held-out pairs of `{cfg.pairs}` from {cfg.fidelity_start}")
    if "latency" in metrics:
        parts.append(
            f"latency at batch {cfg.latency_batch_size} on {'a GPU' if torch.cuda.is_available() else 'the CPU'}"
        )
    return "; ".join(parts)


@command
def main() -> None:
    cfg = parse_config(EvalConfig, description=__doc__)
    metrics = validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    accelerator = Accelerator()
    # One evaluation per output_dir at a time; a failed first run leaves no empty folder behind.
    with locked(
        cfg.output_dir,
        purpose="evaluate",
        is_main_process=accelerator.is_main_process,
        broadcast=lambda x: broadcast_object_list([x])[0],
    ):
        evaluate(cfg, metrics, accelerator=accelerator)


def optional_labels(cfg: EvalConfig, prompts: list[str]) -> tuple[list[int], str]:
    """The prompts' `label_column` labels when the prompt source is a table that has them: (labels, "") or
    ([], why not)."""
    try:
        labelled, labels = load_labelled_prompts(cfg.prompts, column=cfg.prompt_column, label_column=cfg.label_column)
    except ValueError as exc:
        return [], str(exc)
    if labelled != prompts:
        return [], "the labelled rows are not the prompts' rows"
    return labels, ""


def evaluate(cfg: EvalConfig, metrics: list[str], *, accelerator) -> None:
    """Generate (or resume) the samples and compute ``metrics`` (``output_dir`` is locked)."""
    from distill.metrics.fid_features import default_cache_dir
    from teachers.loading import dtype_from_name

    device = accelerator.device
    out = Path(cfg.output_dir)
    samples_dir = out / "samples"
    cache_dir = Path(cfg.metrics_cache) if cfg.metrics_cache else default_cache_dir()
    needs_samples = any(m in SAMPLE_METRICS for m in metrics)

    # 1. Load: the prompts and the samples' identity; a cache of other samples is refused (before the model load).
    labels: list[int] = []
    label_note = ""
    if "prompt_accuracy" in metrics:
        prompts, labels = load_labelled_prompts(cfg.prompts, column=cfg.prompt_column, label_column=cfg.label_column)
    else:
        prompts = load_prompts(cfg.prompts, column=cfg.prompt_column, split=cfg.prompt_split) if cfg.prompts else []
        if "diversity" in metrics:  # labels when the prompt table has them; otherwise diversity groups by prompt text
            labels, label_note = optional_labels(cfg, prompts)
    if "diversity" in metrics:
        groups, grouping = diversity_groups(prompts, labels, cfg.num_samples)
        if len(set(groups)) == len(groups):
            raise ConfigError(
                f"diversity needs at least 2 samples of one prompt {grouping}: num_samples={cfg.num_samples} "
                f"cycles {len(prompts)} prompts once; raise num_samples"
            )
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    identity = {
        "pipeline": str(Path(cfg.pipeline).resolve()) if Path(cfg.pipeline).exists() else cfg.pipeline,
        "pipeline_files": folder_fingerprint(Path(cfg.pipeline)),
        "prompts_sha256": prompts_fingerprint(prompts) if prompts else None,
        "num_prompts": len(prompts),
        "seed": cfg.seed,
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "dtype": dtype_name,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
        "negative_prompt": cfg.negative_prompt,
        "max_sequence_length": cfg.max_sequence_length,
    }
    if needs_samples:
        try:
            samples_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"output_dir {out} is not writable ({exc.strerror or exc}): choose a directory you can write to"
            ) from None
        check_samples_manifest(samples_dir, identity)  # every process, before the slow model load
    if "fid_to_teacher" in metrics:
        check_independent_reference(Path(cfg.teacher_reference), identity)

    # 2. Build: the sampler (student or teacher); check the metrics' weights exist before hours of sampling.
    sampler = Sampler(
        cfg.pipeline,
        device=device,
        dtype=dtype_from_name(dtype_name),
        scheduler=cfg.scheduler,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
        max_sequence_length=cfg.max_sequence_length,
    )
    latent_shape = sampler.latent_shape(cfg.resolution)
    preflight(cfg, metrics, sampler=sampler, cache_dir=cache_dir)  # every process: none may wait on a failed one

    # 3. Loop: the missing sample batches, split across processes (each PNG cached).
    if needs_samples:
        fill_sample_cache(
            sampler,
            samples_dir=samples_dir,
            identity=identity,
            num_samples=cfg.num_samples,
            batch_size=cfg.batch_size,
            prompts=prompts,
            seed=cfg.seed,
            latent_shape=latent_shape,
            is_main_process=accelerator.is_main_process,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
        )
    if not accelerator.is_main_process:  # the metrics read the cached samples on the main process only
        accelerator.end_training()
        return

    # 4. Measure: every metric, from the cached samples or the sampler (main process).
    test_only = [
        k for k in ("fid_extractor", "clip_model", "elatentlpips", "pixel_lpips") if getattr(cfg, k) == TEST_ONLY
    ]
    for key in test_only:
        warn_test_only(key)
    start = time.perf_counter()
    values, details = compute_metrics(
        MetricInputs(
            cfg=cfg,
            metrics=metrics,
            sampler=sampler,
            samples_dir=samples_dir,
            prompts=prompts,
            labels=labels,
            latent_shape=latent_shape,
            device=device,
            cache_dir=cache_dir,
            label_note=label_note,
        )
    )

    # 5. Save: metrics.json, the sample grid, the config, and the exported student's model card.
    grid = out / "samples_grid.png"
    if needs_samples and cfg.grid_size:
        save_grid(samples_dir, min(cfg.grid_size, cfg.num_samples), grid)
    result = {
        "metrics": values,
        "details": details,
        "test_only_models": test_only,
        "pipeline": {"path": cfg.pipeline, "kind": "one-step student" if sampler.is_student else "teacher"},
        "num_samples": cfg.num_samples,
        "num_processes": accelerator.num_processes,
        "device": str(device),
        "metric_seconds": time.perf_counter() - start,
        "config": config_dict(cfg),
        "versions": package_versions(
            "diffusion2gan-toolkit", "torch", "diffusers", "clean-fid", "open_clip_torch", "lpips"
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".metrics.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out / "metrics.json")
    save_config(cfg, out / "evaluate.yaml")
    if sampler.is_student and values:
        from students.model_card import update_model_card_metrics

        # The exported student's card shows what was measured, and how (a card written by hand is left alone).
        warning = f"; random-weight test models ({', '.join(test_only)}): the numbers mean nothing" if test_only else ""
        update_model_card_metrics(cfg.pipeline, values, source=card_source(cfg, metrics) + warning)
    for name, value in values.items():
        print(f"{name}: {value:.6g}")
    print(f"wrote {(out / 'metrics.json').resolve()}" + (f" and {grid.name}" if grid.exists() else ""))
    accelerator.end_training()


if __name__ == "__main__":
    main()
