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


def decode_vae(vae: AutoencoderKL | None, latents: torch.Tensor) -> torch.Tensor:
    """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1] (no VAE: the input is already the image).

    A float16 VAE whose config sets ``force_upcast`` (SDXL's: its fp16 activations overflow into NaN /
    black images) decodes in float32 and is cast back afterwards, as diffusers' SDXL pipeline does.
    """
    if vae is None:  # a pixel-space generator: its output is the image
        return latents.float()
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
    ``vae`` is None for a pixel-space generator (trained from scratch on images): its output is the image.

    Load with ``OneStepGANPipeline.from_pretrained(dir)`` (``DiffusionPipeline.from_pretrained`` cannot
    resolve this class from ``model_index.json``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->student->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "vae"]

    def __init__(self, student, vae: AutoencoderKL, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(
            student=student, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def default_resolution(self) -> int:
        return int(self.student.sample_size) * self.vae_scale_factor

    def encode_prompt(self, prompts: list[str], resolution: tuple[int, int]):
        return encode_text(
            prompts, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
            tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2, resolution=resolution,
        )

    def _noise(self, latents, batch: int, generator, height, width) -> torch.Tensor:
        """The unit-Gaussian noise [N,C,h,w] the student reads: ``latents`` as given, or drawn with ``generator``."""
        if latents is None:
            side = self.default_resolution()
            height, width = height or side, width or side
            if height % self.vae_scale_factor or width % self.vae_scale_factor:
                raise ValueError(f"height and width must be divisible by the VAE factor {self.vae_scale_factor}")
            shape = (batch, self.student.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        elif latents.shape[0] != batch:
            raise ValueError(f"latents has batch {latents.shape[0]} but there are {batch} prompts x images per prompt")
        return latents.to(device=self._execution_device, dtype=self.student.dtype)

    def _conditioning(self, prompts: list[str], noise: torch.Tensor):
        size = (noise.shape[-2] * self.vae_scale_factor, noise.shape[-1] * self.vae_scale_factor)
        return self.encode_prompt(prompts, size).to(device=noise.device, dtype=noise.dtype)

    def _style_student(self, feature: str):
        if not hasattr(self.student, "encode"):
            raise ValueError(f"{feature} needs a style-based student (gigagan, stylegan_t); "
                             f"{type(self.student).__name__} maps noise to latents directly")
        return self.student

    def _finish(self, out: torch.Tensor, output_type: str, return_dict: bool):
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; choose pil, np, pt or latent")
        images = out if output_type == "latent" else self.image_processor.postprocess(self.decode_latents(out), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

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
        truncation_psi: float = 1.0,
    ):
        """Generate ``len(prompt) * num_images_per_prompt`` images in one generator step.

        latents: unit-Gaussian noise ``[N,C,h,w]`` (the teacher's ``latents=`` input); drawn with
        ``generator`` when not given. output_type: ``pil``, ``np``, ``pt`` (images in [0, 1]) or
        ``latent`` (VAE-scaled latents). ``negative_prompt`` is accepted for drop-in compatibility
        with diffusers pipelines; a one-step GAN has no classifier-free guidance, so it is ignored.
        truncation_psi: style students only (StyleGAN-T §3.3): 1 = none, 0 = the prompt's mean image;
        lower values trade variation for fidelity and text alignment.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; choose pil, np, pt or latent")
        if negative_prompt is not None:
            logger.warning("negative_prompt is ignored: one-step students are distilled with guidance built in")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        noise = self._noise(latents, len(prompts), generator, height, width)  # [N,C,h,w]
        cond = self._conditioning(prompts, noise)
        kwargs = {}
        if truncation_psi != 1.0:
            self._style_student("truncation_psi")
            kwargs["truncation_psi"] = truncation_psi
        out = self.student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs(), **kwargs)  # [N,C,h,w]
        return self._finish(out, output_type, return_dict)

    @torch.no_grad()
    def interpolate(
        self,
        prompt: str,
        latents: torch.Tensor | None = None,
        num_images: int = 8,
        *,
        generator: torch.Generator | None = None,
        truncation_psi: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """``num_images`` images on the path between two noise maps ``latents`` [2,C,h,w] (drawn with
        ``generator`` when not given) for one prompt. The noise is slerped (every point stays a
        unit-Gaussian sample) and the style w is interpolated linearly between the end points' styles
        (StyleGAN's interpolation in W, smoother than through the mapping network)."""
        student = self._style_student("interpolate")
        if num_images < 2:
            raise ValueError(f"num_images must be at least 2 (the two end points); got {num_images}")
        ends = self._noise(latents, 2, generator, None, None)
        t = torch.linspace(0, 1, num_images, device=ends.device, dtype=torch.float32)
        noise = slerp(ends[0].float(), ends[1].float(), t).to(ends.dtype)  # [T,C,h,w]
        cond = self._conditioning([prompt] * (num_images + 2), noise)
        embeds, added = cond.prompt_embeds, cond.added_cond_kwargs()
        pick = lambda a, b: None if added is None else {k: v[a:b] for k, v in added.items()}  # noqa: E731
        w_ends = student.encode(ends, embeds[:2], pick(0, 2), truncation_psi=truncation_psi).w
        codes = student.encode(noise, embeds[2:], pick(2, None), truncation_psi=truncation_psi)
        codes.w = torch.lerp(w_ends[:1], w_ends[1:], t[:, None].to(w_ends.dtype))
        return self._finish(student.synthesize(codes), output_type, return_dict)

    @torch.no_grad()
    def style_mix(
        self,
        prompt: str | list[str],
        coarse_latents: torch.Tensor,
        fine_latents: torch.Tensor,
        crossover: int = 1,
        *,
        truncation_psi: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Style mixing (StyleGAN §3.1): the synthesis levels below ``crossover`` (coarse layout) take
        their style and noise features from ``coarse_latents`` [N,C,h,w], the finer levels from
        ``fine_latents`` [N,C,h,w]."""
        student = self._style_student("style_mix")
        prompts = [prompt] * coarse_latents.shape[0] if isinstance(prompt, str) else list(prompt)
        coarse = self._noise(coarse_latents, len(prompts), None, None, None)
        fine = self._noise(fine_latents, len(prompts), None, None, None)
        if coarse.shape != fine.shape:
            raise ValueError(f"coarse_latents {tuple(coarse.shape)} and fine_latents {tuple(fine.shape)} must have one shape")
        cond = self._conditioning(prompts, coarse)
        a = student.encode(coarse, cond.prompt_embeds, cond.added_cond_kwargs(), truncation_psi=truncation_psi)
        b = student.encode(fine, cond.prompt_embeds, cond.added_cond_kwargs(), truncation_psi=truncation_psi)
        return self._finish(student.synthesize(a.mix(b, crossover, student.num_levels)), output_type, return_dict)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise maps [C,h,w] at ``t`` [T] -> [T,C,h,w] (linear when parallel)."""
    cos = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    t = t[:, None, None, None]
    if omega.abs() < 1e-4:
        return torch.lerp(a[None], b[None], t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
