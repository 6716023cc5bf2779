"""Losses used by the distillation scripts (library code: explicit keyword arguments only).

Attributes are imported lazily (PEP 562) so that entry scripts do not pay for kornia / lpips at start-up.
"""

from importlib import import_module

_EXPORTS = {
    "SharedAugment": "augment",
    "parse_policy": "augment",
    "PUBLISHED": "elatentlpips",
    "ELatentLPIPS": "elatentlpips",
    "LatentLPIPSNet": "elatentlpips",
    "convert_reference_state_dict": "elatentlpips",
    "fetch_published": "elatentlpips",
    "load_latent_lpips": "elatentlpips",
    "load_reference_checkpoint": "elatentlpips",
    "PixelLPIPS": "pixel_lpips",
    "build_lpips": "pixel_lpips",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__
