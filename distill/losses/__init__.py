"""Losses used by the distillation scripts (library code: explicit keyword arguments only).

Attributes are imported lazily (PEP 562) so that entry scripts do not pay for kornia / lpips at start-up.
"""

from distill.core.lazy import lazy_exports

_EXPORTS = {
    "SharedAugment": "augment",
    "parse_policy": "augment",
    "ELatentLPIPS": "elatentlpips",
    "LatentLPIPSNet": "elatentlpips",
    "PUBLISHED": "elatentlpips_weights",
    "FetchOptions": "elatentlpips_weights",
    "convert_reference_state_dict": "elatentlpips_weights",
    "fetch_published": "elatentlpips_weights",
    "load_latent_lpips": "elatentlpips_weights",
    "load_reference_checkpoint": "elatentlpips_weights",
    "PixelLPIPS": "pixel_lpips",
    "build_pixel_lpips": "pixel_lpips",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
