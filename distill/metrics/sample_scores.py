"""FID, precision/recall, diversity and CLIP score of the cached evaluation samples (see :mod:`.sample_cache`), with
progress bars; the feature metrics share one extractor and one extraction of the samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data_gen.prompts import prompt_for_index
from distill.metrics.sample_cache import read_samples, sample_path


def load_extractor(*, extractor_name: str, device, cache_dir: Path, load_classifier=None):
    """The FID feature extractor ``extractor_name``: ``inception`` (weights in ``cache_dir``), a path to the
    Inception file, a classifier folder (read with ``load_classifier``, folder -> module), or ``random-tiny``."""
    from distill.metrics import fid

    name = extractor_name if extractor_name != "inception" else str(cache_dir)
    return fid.load_fid_extractor(name, device=device, load_classifier=load_classifier)


def sample_features(
    *, samples_dir: Path, num_samples: int, extractor, batch_size: int, num_workers: int, device
) -> np.ndarray:
    """Features ``[num_samples,D]`` (float64) of the cached samples: the one extraction FID, precision/recall and
    diversity share."""
    from distill.metrics import fid

    bar = tqdm(total=num_samples, desc="sample features", unit="img", dynamic_ncols=True, leave=False)
    files = [sample_path(samples_dir, i) for i in range(num_samples)]
    feats = fid.extract_features_from_files(
        files, extractor=extractor, batch_size=batch_size, num_workers=num_workers, device=device, progress=bar.update
    )
    bar.close()
    return feats


def compute_fid(
    *,
    samples_dir: Path,
    num_samples: int,
    extractor_name: str,
    references: dict[str, dict],
    batch_size: int,
    num_workers: int,
    device,
    cache_dir: Path,
    load_classifier=None,
    extractor=None,
    features: np.ndarray | None = None,
) -> tuple[dict[str, float], dict]:
    """FID of the cached samples against each of ``references`` (name -> ``dict(reference=folder or .npz,
    limit=, center_crop=)``); the samples' features are extracted once for all of them.

    ``extractor_name``: see :func:`load_extractor`. ``extractor`` and ``features`` (``[num_samples,D]``): an
    extractor already loaded and the samples' features already extracted with it (shared with other metrics)."""
    from distill.metrics import fid

    if extractor is None:
        extractor = load_extractor(
            extractor_name=extractor_name, device=device, cache_dir=cache_dir, load_classifier=load_classifier
        )
    stats, details = {}, {}
    for key, ref in references.items():
        bar = tqdm(desc=f"{key} reference features", unit="img", dynamic_ncols=True, leave=False)
        stats[key], details[key] = fid.reference_statistics(
            ref["reference"],
            extractor=extractor,
            cache_dir=cache_dir,
            limit=ref.get("limit", 0),
            center_crop=ref.get("center_crop", False),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=bar.update,
        )
        bar.close()
    if features is None:
        features = sample_features(
            samples_dir=samples_dir,
            num_samples=num_samples,
            extractor=extractor,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
        )
    mine = fid.FIDStats.from_features(features, extractor_id=extractor.extractor_id)
    values = {key: fid.frechet_distance(mine, ref_stats) for key, ref_stats in stats.items()}
    return values, {
        key: {**info, "extractor_id": extractor.extractor_id, "num_samples": num_samples}
        for key, info in details.items()
    }


def compute_precision_recall(
    *, features: np.ndarray, real_features: np.ndarray, k: int, device
) -> tuple[dict[str, float], dict]:
    """``precision`` and ``recall`` (Kynkäänniemi et al. 2019) of the samples' features ``[M,D]`` against the
    real images' ``[N,D]`` (same extractor)."""
    from distill.metrics.precision_recall import precision_recall

    precision, recall = precision_recall(
        real_features=torch.from_numpy(real_features).to(device),
        generated_features=torch.from_numpy(features).to(device),
        k=k,
    )
    return {"precision": precision, "recall": recall}, {
        "k": k,
        "num_samples": len(features),
        "num_real": len(real_features),
    }


def compute_diversity(
    *,
    features: np.ndarray,
    groups: list,
    grouping: str,
    real_features: np.ndarray | None = None,
    real_groups: list | None = None,
    device,
    note: str = "",
) -> tuple[dict[str, float], dict]:
    """``diversity``: the mean pairwise feature distance within each group of samples (``features`` ``[M,D]``;
    ``groups[i]``: sample i's prompt label or prompt text, as ``grouping`` says), averaged over the groups.

    With ``real_features`` ``[N,D]`` and their ``real_groups`` (labels): also ``diversity_real``, the same over
    the real images of the sampled classes, and ``diversity_ratio`` = diversity / diversity_real (both over the
    classes with at least 2 real images, when some have fewer)."""
    from distill.metrics.diversity import group_diversity

    mine = group_diversity(features=torch.from_numpy(features).to(device), groups=groups)
    if not mine:
        raise ValueError("diversity needs at least 2 samples of one prompt (or class): raise num_samples")
    values = {"diversity": sum(mine.values()) / len(mine)}
    info = {"grouping": grouping, "num_groups": len(mine), "groups_with_one_sample": len(set(groups)) - len(mine)}
    if len(mine) <= 100:
        info["per_group"] = {str(g): v for g, v in mine.items()}
    if real_features is not None and real_groups is not None:
        wanted = set(mine)
        keep = [i for i, g in enumerate(real_groups) if g in wanted]
        real = group_diversity(
            features=torch.from_numpy(real_features[keep]).to(device), groups=[real_groups[i] for i in keep]
        )
        if real:
            values["diversity_real"] = sum(real.values()) / len(real)
            sampled = sum(mine[g] for g in real) / len(real)  # the same classes as diversity_real
            values["diversity_ratio"] = sampled / max(values["diversity_real"], 1e-12)
            info["num_real"] = len(keep)
            if len(real) <= 100:
                info["per_group_real"] = {str(g): real[g] for g in mine if g in real}
            missing = sorted(wanted - set(real), key=str)
            if missing:
                info["classes_without_real_pairs"] = [str(g) for g in missing]
        else:
            note = (
                note + "; " if note else ""
            ) + "the reference has fewer than 2 images of every sampled class: no diversity_real"
    if note:
        info["note"] = note
    return values, info


def compute_clip_score(
    *,
    samples_dir: Path,
    num_samples: int,
    prompts: list[str],
    clip_model: str,
    clip_pretrained: str,
    batch_size: int,
    device,
) -> tuple[float, dict]:
    """Mean CLIP score of sample ``i`` against prompt ``i`` (cycled)."""
    from distill.metrics.clip_score import clip_scores, load_clip_model

    clip = load_clip_model(clip_model, clip_pretrained, device=device)
    scores, batch, idx = [], [], []
    for i, img in enumerate(
        tqdm(
            read_samples(samples_dir, num_samples),
            total=num_samples,
            desc="CLIP score",
            unit="img",
            dynamic_ncols=True,
            leave=False,
        )
    ):
        batch.append(img)
        idx.append(i)
        if len(batch) == batch_size or i == num_samples - 1:
            scores.append(
                clip_scores(
                    batch,
                    [prompt_for_index(prompts, j) for j in idx],
                    model=clip.model,
                    preprocess=clip.preprocess,
                    tokenizer=clip.tokenizer,
                    batch_size=batch_size,
                    device=device,
                )
            )
            batch, idx = [], []
    return float(torch.cat(scores).double().mean()), {"model_id": clip.model_id, "num_samples": num_samples}
