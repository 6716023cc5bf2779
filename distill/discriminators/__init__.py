"""Discriminators for the GAN loss of stage two."""

from .transformer import TransformerDiscriminator
from .unet import UNetDiscriminator

__all__ = ["TransformerDiscriminator", "UNetDiscriminator"]
