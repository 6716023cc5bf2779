"""Evaluation metrics (library code: explicit keyword arguments, injectable feature extractors / models).

- :mod:`.fid`: FID with clean-fid's protocol: statistics, cached reference statistics, Frechet distance;
  :mod:`.fid_features` (extractors, the feature path) and :mod:`.image_io` (image files) under it.
- :mod:`.precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019), k-NN hyperspheres in
  the FID features; :mod:`.diversity`: per-prompt mean pairwise feature distance (mode collapse in a number).
- :mod:`.clip_score`: open_clip cosine similarity between images and prompts.
- :mod:`.fidelity`: E-LatentLPIPS / LPIPS / PSNR between student outputs and teacher targets (held-out pairs).
- :mod:`.latency`: seconds per image, images per second, peak memory.

Attributes are imported lazily (PEP 562) so importing one metric does not import open_clip or clean-fid.
"""

from distill.core.lazy import lazy_exports

# The model name that selects seeded random-weight models for any metric (tests only: the numbers mean nothing).
TEST_ONLY = "random-tiny"

_EXPORTS = {
    "FIDStats": "fid",
    "RandomTinyExtractor": "fid_features",
    "InceptionExtractor": "fid_features",
    "extract_features": "fid_features",
    "extract_features_from_files": "fid_features",
    "fid_from_files": "fid",
    "fid_from_images": "fid",
    "frechet_distance": "fid",
    "images_to_uint8": "image_io",
    "load_fid_extractor": "fid_features",
    "load_inception": "fid_features",
    "inception_path": "fid_features",
    "reference_statistics": "fid",
    "reference_features": "fid",
    "knn_radii": "precision_recall",
    "inside_manifold": "precision_recall",
    "group_diversity": "diversity",
    "mean_pairwise_distance": "diversity",
    "ClipModel": "clip_score",
    "build_random_tiny_clip": "clip_score",
    "clip_scores": "clip_score",
    "load_clip": "clip_score",
    "load_clip_model": "clip_score",
    "fidelity_metrics": "fidelity",
    "psnr": "fidelity",
    "LatencyResult": "latency",
    "measure_latency": "latency",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
