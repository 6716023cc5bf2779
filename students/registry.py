"""The registry of the one-step generators that train without a teacher (``GENERATORS``): their classes and size
presets, beside the generators. Stage two's view of every student (how it is built from a teacher, the training
defaults that suit it) lives with stage two, in ``distill/distillation/students.py``."""

from __future__ import annotations

from .gigagan import PRESETS as GIGAGAN_PRESETS
from .gigagan import GigaGANGenerator
from .stylegan_t import PRESETS as STYLEGAN_T_PRESETS
from .stylegan_t import StyleGANTGenerator

# name -> (class, size presets): the style-based GAN generators, built by ``cls.for_latents(size=...)``.
GENERATORS: dict[str, tuple[type, dict]] = {
    "gigagan": (GigaGANGenerator, GIGAGAN_PRESETS),
    "stylegan_t": (StyleGANTGenerator, STYLEGAN_T_PRESETS),
}
