"""Discriminators for the GAN loss of stage two."""

from .unet import UNetDiscriminator

__all__ = ["UNetDiscriminator"]
