"""One-step generators and their diffusers-style pipeline.

Generator interface (every student): ``forward(noise [N,C,H,W], prompt_embeds [N,L,D],
added_cond_kwargs=None) -> latents [N,C,H,W]`` plus ``latent_channels`` and ``sample_size``.
"""

from .gigagan import GigaGANGenerator
from .pipeline import OneStepGANPipeline
from .sd3_student import SD3TransformerStudent
from .stylegan_t import StyleGANTGenerator
from .text import TextConditioning, encode_sd3_text, encode_text
from .unet_student import UNetStudent

__all__ = [
    "GigaGANGenerator",
    "OneStepGANPipeline",
    "SD3TransformerStudent",
    "StyleGANTGenerator",
    "TextConditioning",
    "UNetStudent",
    "encode_sd3_text",
    "encode_text",
]
