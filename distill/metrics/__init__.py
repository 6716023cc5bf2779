"""Evaluation metrics (library code: explicit keyword arguments, injectable feature extractors / models).

- :mod:`.fid`: FID with clean-fid's resize, Inception-v3 and Frechet distance; cached reference statistics.
- :mod:`.clip_score`: open_clip cosine similarity between images and prompts.
- :mod:`.fidelity`: E-LatentLPIPS / LPIPS / PSNR between student outputs and teacher targets.
- :mod:`.latency`: seconds per image, images per second, peak memory.

Attributes are imported lazily (PEP 562) so importing one metric does not import open_clip or clean-fid.
"""

from distill._lazy import lazy_exports

_EXPORTS = {
    "FIDStats": "fid",
    "RandomTinyExtractor": "fid",
    "InceptionExtractor": "fid",
    "extract_features": "fid",
    "extract_features_from_files": "fid",
    "fid_from_files": "fid",
    "fid_from_images": "fid",
    "frechet_distance": "fid",
    "images_to_uint8": "fid",
    "load_fid_extractor": "fid",
    "load_inception": "fid",
    "inception_path": "fid",
    "reference_statistics": "fid",
    "ClipModel": "clip_score",
    "build_random_tiny_clip": "clip_score",
    "clip_scores": "clip_score",
    "load_clip": "clip_score",
    "load_clip_model": "clip_score",
    "resolve_clip_weights": "clip_score",
    "fidelity_metrics": "fidelity",
    "psnr": "fidelity",
    "LatencyResult": "latency",
    "measure_latency": "latency",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
