"""``OneStepGANPipeline``: prompt (+ noise) -> one generator forward -> VAE decode.

``pipe(prompt, latents=noise)`` is the one-step estimate of ``teacher(prompt, latents=noise)``: the
same unit-Gaussian ``noise`` tensor the teacher pipeline takes as ``latents=``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .text import encode_text

logger = logging.get_logger(__name__)


def decode_vae(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1].

    A float16 VAE whose config sets ``force_upcast`` (SDXL's: its fp16 activations overflow into NaN /
    black images) decodes in float32 and is cast back afterwards, as diffusers' SDXL pipeline does.
    """
    cfg = vae.config
    raw = latents.float() / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    if not (vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)):
        return vae.decode(raw.to(vae.dtype)).sample
    vae.to(torch.float32)
    try:
        return vae.decode(raw).sample
    finally:
        vae.to(torch.float16)


class OneStepGANPipeline(DiffusionPipeline):
    """Components: ``student`` (any generator with ``forward(noise, prompt_embeds, added_cond_kwargs)``),
    ``vae``, ``text_encoder``, ``tokenizer`` and, for SDXL students, ``text_encoder_2``, ``tokenizer_2``.

    Load with ``OneStepGANPipeline.from_pretrained(dir)`` (``DiffusionPipeline.from_pretrained`` cannot
    resolve this class from ``model_index.json``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->student->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, student, vae: AutoencoderKL, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(
            student=student, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def default_resolution(self) -> int:
        return int(self.student.sample_size) * self.vae_scale_factor

    def encode_prompt(self, prompts: list[str], resolution: tuple[int, int]):
        return encode_text(
            prompts, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
            tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2, resolution=resolution,
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1] (fp32 for an fp16 ``force_upcast`` VAE)."""
        return decode_vae(self.vae, latents)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        height: int | None = None,
        width: int | None = None,
    ):
        """Generate ``len(prompt) * num_images_per_prompt`` images in one generator step.

        latents: unit-Gaussian noise ``[N,C,h,w]`` (the teacher's ``latents=`` input); drawn with
        ``generator`` when not given. output_type: ``pil``, ``np``, ``pt`` (images in [0, 1]) or
        ``latent`` (VAE-scaled latents). ``negative_prompt`` is accepted for drop-in compatibility
        with diffusers pipelines; a one-step GAN has no classifier-free guidance, so it is ignored.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; choose pil, np, pt or latent")
        if negative_prompt is not None:
            logger.warning("negative_prompt is ignored: one-step students are distilled with guidance built in")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self._execution_device
        dtype = self.student.dtype
        if latents is None:
            side = self.default_resolution()
            height, width = height or side, width or side
            if height % self.vae_scale_factor or width % self.vae_scale_factor:
                raise ValueError(f"height and width must be divisible by the VAE factor {self.vae_scale_factor}")
            shape = (len(prompts), self.student.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif latents.shape[0] != len(prompts):
            raise ValueError(f"latents has batch {latents.shape[0]} but there are {len(prompts)} prompts x images per prompt")
        noise = latents.to(device=device, dtype=dtype)  # [N,C,h,w]
        size = (noise.shape[-2] * self.vae_scale_factor, noise.shape[-1] * self.vae_scale_factor)
        cond = self.encode_prompt(prompts, size).to(device=device, dtype=dtype)
        out = self.student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs())  # [N,C,h,w]
        if output_type == "latent":
            images = out
        else:
            images = self.image_processor.postprocess(self.decode_latents(out), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
