"""Discriminators: the teacher-UNet D of stage two (unet.py); for from-scratch training also StyleGAN-T's
projected D on a frozen feature network (projected.py, features.py), GigaGAN's multi-scale D (multiscale.py)
the teacher-UNet D without pairs (unpaired_unet.py) and several of them as one (ensemble.py). Imported lazily (PEP
562)."""

from distill.core.lazy import lazy_exports

_EXPORTS = {
    "UNetDiscriminator": "unet",
    "TransformerDiscriminator": "transformer",
    "UnpairedUNetDiscriminator": "unpaired_unet",
    "ProjectedDiscriminator": "projected",
    "LatentDecoder": "projected",
    "MultiScaleDiscriminator": "multiscale",
    "DiscriminatorEnsemble": "ensemble",
    "FeatureNetwork": "features",
    "build_feature_network": "features",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
