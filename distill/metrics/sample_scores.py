"""FID and CLIP score of the cached evaluation samples (see :mod:`.sample_cache`), with progress bars."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_gen.prompts import prompt_for_index
from distill.metrics.sample_cache import read_samples, sample_path


def compute_fid(*, samples_dir: Path, num_samples: int, extractor_name: str, references: dict[str, dict],
                batch_size: int, num_workers: int, device, cache_dir: Path,
                load_classifier=None) -> tuple[dict[str, float], dict]:
    """FID of the cached samples against each of ``references`` (name -> ``dict(reference=folder or .npz,
    limit=, center_crop=)``); the samples' features are extracted once for all of them.

    ``extractor_name``: ``inception`` (weights in ``cache_dir``), a path to the Inception file, a
    classifier folder (read with ``load_classifier``, folder -> module), or ``random-tiny``."""
    from distill.metrics import fid

    name = extractor_name if extractor_name != "inception" else str(cache_dir)
    extractor = fid.load_fid_extractor(name, device=device, load_classifier=load_classifier)
    stats, details = {}, {}
    for key, ref in references.items():
        bar = tqdm(desc=f"{key} reference features", unit="img", dynamic_ncols=True, leave=False)
        stats[key], details[key] = fid.reference_statistics(
            ref["reference"], extractor=extractor, cache_dir=cache_dir, limit=ref.get("limit", 0),
            center_crop=ref.get("center_crop", False), batch_size=batch_size, num_workers=num_workers,
            device=device, progress=bar.update,
        )
        bar.close()
    bar = tqdm(total=num_samples, desc="FID sample features", unit="img", dynamic_ncols=True, leave=False)
    files = [sample_path(samples_dir, i) for i in range(num_samples)]
    feats = fid.extract_features_from_files(files, extractor=extractor, batch_size=batch_size, num_workers=num_workers,
                                            device=device, progress=bar.update)
    bar.close()
    mine = fid.FIDStats.from_features(feats, extractor_id=extractor.extractor_id)
    values = {key: fid.frechet_distance(mine, ref_stats) for key, ref_stats in stats.items()}
    return values, {key: {**info, "extractor_id": extractor.extractor_id, "num_samples": num_samples} for key, info in details.items()}


def compute_clip_score(*, samples_dir: Path, num_samples: int, prompts: list[str], clip_model: str,
                       clip_pretrained: str, batch_size: int, device) -> tuple[float, dict]:
    """Mean CLIP score of sample ``i`` against prompt ``i`` (cycled)."""
    from distill.metrics.clip_score import clip_scores, load_clip_model

    clip = load_clip_model(clip_model, clip_pretrained, device=device)
    scores, batch, idx = [], [], []
    for i, img in enumerate(tqdm(read_samples(samples_dir, num_samples), total=num_samples, desc="CLIP score",
                                 unit="img", dynamic_ncols=True, leave=False)):
        batch.append(img)
        idx.append(i)
        if len(batch) == batch_size or i == num_samples - 1:
            scores.append(clip_scores(batch, [prompt_for_index(prompts, j) for j in idx], model=clip.model,
                                      preprocess=clip.preprocess, tokenizer=clip.tokenizer,
                                      batch_size=batch_size, device=device))
            batch, idx = [], []
    return float(torch.cat(scores).double().mean()), {"model_id": clip.model_id, "num_samples": num_samples}
