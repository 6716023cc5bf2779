"""``OneStepGANPipeline``: prompt (+ noise) -> one generator forward -> VAE decode.

Called like SD-Turbo: ``pipe(prompt, num_inference_steps=1, guidance_scale=0.0)``, or with
``prompt_embeds`` (+ SDXL's and SD3's ``pooled_prompt_embeds``). ``pipe(prompt, latents=noise)`` is the one-step
estimate of ``teacher(prompt, latents=noise)``: the same unit-Gaussian ``noise`` tensor the teacher
pipeline takes as ``latents=``.

This file and ``text.py`` import nothing else from this project: ``students/export.py`` writes them,
flattened into one module, next to an exported student's weights, so that
``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` loads it without this project.
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .latents import decode_vae, vae_scale_factor
from .text import TextConditioning, encode_sd3_text, encode_text, sdxl_time_ids

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# diffusers pipeline arguments a one-step generator cannot honour, with the reason given when refused.
_NO_SAMPLER = "there is no sampler: the student makes the image in one generator step"
_NO_CFG = "a one-step GAN student has no classifier-free guidance (the teacher's guidance is distilled into it)"
UNSUPPORTED_ARGUMENTS = {
    **dict.fromkeys(("timesteps", "sigmas", "eta", "denoising_end", "guidance_rescale", "strength"), _NO_SAMPLER),
    **dict.fromkeys(
        ("callback", "callback_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs"),
        "there are no denoising steps to call back on",
    ),
    **dict.fromkeys(
        (
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "negative_prompt_2",
            "negative_prompt_3",
            "negative_original_size",
            "negative_crops_coords_top_left",
            "negative_target_size",
            "skip_guidance_layers",
            "skip_layer_guidance_scale",
            "skip_layer_guidance_start",
            "skip_layer_guidance_stop",
        ),
        _NO_CFG,
    ),
    **dict.fromkeys(
        (
            "prompt_2",
            "prompt_3",
            "original_size",
            "crops_coords_top_left",
            "target_size",
            "clip_skip",
            "max_sequence_length",
        ),
        "the student was trained with the teacher's default text conditioning only",
    ),
    **dict.fromkeys(
        ("ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs", "joint_attention_kwargs", "image"),
        "the student has no adapters or image inputs",
    ),
    "mu": _NO_SAMPLER,
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> # An exported student folder (or hub repo) carries its own code: no other install needed.
        >>> pipe = DiffusionPipeline.from_pretrained("runs/student/pipeline", trust_remote_code=True)
        >>> image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0).images[0]

        >>> # The one-step estimate of teacher("a photo of a cat", latents=noise), as VAE-scaled latents.
        >>> noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        >>> latents = pipe("a photo of a cat", latents=noise, output_type="latent").images
        ```
"""


class OneStepGANPipeline(DiffusionPipeline):
    """Components: ``student`` (any generator with ``forward(noise, prompt_embeds, added_cond_kwargs)``),
    ``vae``, ``text_encoder``, ``tokenizer`` and, for SDXL and SD3 students, ``text_encoder_2``, ``tokenizer_2``
    (SD3: also ``text_encoder_3``, ``tokenizer_3`` when the teacher has T5).
    ``vae`` is None for a pixel-space generator (trained from scratch on images): its output is the image.
    ``text_conditioning="sd3"`` marks an SD3 student, whose prompts are encoded as
    ``StableDiffusion3Pipeline.encode_prompt`` does with ``max_sequence_length`` T5 tokens (zeros of width
    ``joint_attention_dim`` without T5).

    Load an exported folder with ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` (the
    code saved next to the weights) or, with this project installed, ``OneStepGANPipeline.from_pretrained(dir)``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->student->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "vae"]

    def __init__(
        self,
        student,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        text_conditioning: str | None = None,
        max_sequence_length: int | None = None,
        joint_attention_dim: int | None = None,
    ):
        super().__init__()
        self.register_modules(
            student=student,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        if text_conditioning not in (None, "sd3"):
            raise ValueError(
                f"unknown text_conditioning {text_conditioning!r}; choose sd3 (or None: SD / SDXL by the encoders)"
            )
        if text_conditioning is not None:  # SD / SDXL folders keep their model_index.json as it was
            self.register_to_config(
                text_conditioning=text_conditioning,
                max_sequence_length=max_sequence_length,
                joint_attention_dim=joint_attention_dim,
            )
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``model_index.json`` as this class reads it. An exported folder names its own code files
        (``_class_name`` and ``student`` as ``[module, class]``), which diffusers would run with
        ``trust_remote_code``; called on this class, the pipeline is this class and the student is the
        class of that name in this class's package when it has one (this project's own, imported code)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]
            package = sys.modules.get(cls.__module__.split(".")[0])
            library, name = config.get("student") or (None, None)
            student_cls = getattr(package, name, None) if library is not None and name else None
            if isinstance(student_cls, type):
                config["student"] = [student_cls.__module__, name]
        return out

    def default_resolution(self) -> int:
        return int(self.student.sample_size) * self.vae_scale_factor

    @property
    def is_sd3(self) -> bool:
        return self.config.get("text_conditioning") == "sd3"

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and not self.is_sd3

    def encode_prompt(self, prompts: list[str], resolution: tuple[int, int]) -> TextConditioning:
        if self.is_sd3:
            return encode_sd3_text(
                prompts,
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                tokenizer_2=self.tokenizer_2,
                text_encoder_2=self.text_encoder_2,
                tokenizer_3=self.tokenizer_3,
                text_encoder_3=self.text_encoder_3,
                max_sequence_length=self.config.max_sequence_length,
                joint_attention_dim=self.config.joint_attention_dim,
            )
        return encode_text(
            prompts,
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            tokenizer_2=self.tokenizer_2,
            text_encoder_2=self.text_encoder_2,
            resolution=resolution,
        )

    def check_inputs(
        self,
        prompt,
        height: int | None,
        width: int | None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        unsupported: dict | None = None,
    ) -> None:
        """One-line errors for what a one-step generator cannot honour; a warning for a guidance scale it ignores."""
        for name in unsupported or {}:
            if name not in UNSUPPORTED_ARGUMENTS:
                raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {name!r}")
            raise ValueError(f"{name} is not supported: {UNSUPPORTED_ARGUMENTS[name]}; remove it")
        if negative_prompt is not None:
            raise ValueError(f"negative_prompt is not supported: {_NO_CFG}; rephrase the prompt instead")
        if num_inference_steps != 1:
            raise ValueError(
                f"num_inference_steps must be 1 for a one-step GAN student (got {num_inference_steps}): {_NO_SAMPLER}"
            )
        if guidance_scale > 1.0:
            logger.warning(
                f"guidance_scale={guidance_scale} is ignored: the teacher's guidance is distilled into the "
                "student; pass guidance_scale=0.0"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt or prompt_embeds (exactly one of them)")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise ValueError(f"prompt_embeds must be [N,L,D]; got {tuple(prompt_embeds.shape)}")
            if (self.is_sdxl or self.is_sd3) and pooled_prompt_embeds is None:
                family = "SD3" if self.is_sd3 else "SDXL"
                raise ValueError(
                    f"this is an {family} student: pass pooled_prompt_embeds [N,P] with prompt_embeds "
                    f"(both from StableDiffusion{'3' if self.is_sd3 else 'XL'}Pipeline.encode_prompt)"
                )
        if pooled_prompt_embeds is not None:
            if not (self.is_sdxl or self.is_sd3):
                raise ValueError(
                    "pooled_prompt_embeds is for SDXL students and SD3 ones; this student has one text encoder: pass "
                    "prompt_embeds only"
                )
            if (
                prompt_embeds is None
                or pooled_prompt_embeds.ndim != 2
                or pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]
            ):
                raise ValueError(
                    f"pooled_prompt_embeds must be [N,P] with prompt_embeds' N; got {tuple(pooled_prompt_embeds.shape)}"
                )
        for name, side in (("height", height), ("width", width)):
            if side is not None and (side <= 0 or side % self.vae_scale_factor):
                raise ValueError(
                    f"{name} must be a positive multiple of the VAE factor {self.vae_scale_factor}; got {side}"
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose {', '.join(OUTPUT_TYPES)}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1; got {num_images_per_prompt}")

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The unit-Gaussian noise [N,C,h,w] the student reads: ``latents`` as given, or drawn with ``generator``
        (one per image when a list). No ``init_noise_sigma`` scaling: the student reads the teacher's noise as is."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images: pass one per image (prompts x "
                "num_images_per_prompt)"
            )
        if latents is None:
            # Drawn in float32 whatever the student's dtype, so that a seed gives the same image in fp16 and fp32.
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must be {list(shape)} (prompts x num_images_per_prompt, channels, height and "
                f"width / {self.vae_scale_factor}); got {list(latents.shape)}"
            )
        return latents.to(device=device, dtype=dtype)

    def _noise(self, latents, batch: int, generator, height=None, width=None) -> torch.Tensor:
        if latents is not None:  # the noise decides the size
            height, width = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        side = self.default_resolution()
        return self.prepare_latents(
            batch,
            self.student.latent_channels,
            height or side,
            width or side,
            self.student.dtype,
            self._execution_device,
            generator,
            latents,
        )

    def _conditioning(self, prompts: list[str], noise: torch.Tensor) -> TextConditioning:
        size = (noise.shape[-2] * self.vae_scale_factor, noise.shape[-1] * self.vae_scale_factor)
        return self.encode_prompt(prompts, size).to(device=noise.device, dtype=noise.dtype)

    def _given_conditioning(
        self, prompt_embeds, pooled_prompt_embeds, repeat: int, noise: torch.Tensor
    ) -> TextConditioning:
        """``prompt_embeds`` (+ pooled, with the default SDXL time ids) repeated per image."""
        rep = lambda t: None if t is None else t.repeat_interleave(repeat, dim=0)  # noqa: E731
        size = (noise.shape[-2] * self.vae_scale_factor, noise.shape[-1] * self.vae_scale_factor)
        pooled = rep(pooled_prompt_embeds)
        time_ids = (
            None
            if pooled is None or self.is_sd3
            else sdxl_time_ids(size, batch=pooled.shape[0], dtype=pooled.dtype, device=pooled.device)
        )
        return TextConditioning(rep(prompt_embeds), pooled, time_ids).to(device=noise.device, dtype=noise.dtype)

    def _style_student(self, feature: str):
        if not hasattr(self.student, "encode"):
            raise ValueError(
                f"{feature} needs a style-based student (gigagan, stylegan_t); "
                f"{type(self.student).__name__} maps noise to latents directly"
            )
        return self.student

    def _finish(self, out: torch.Tensor, output_type: str, return_dict: bool):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose {', '.join(OUTPUT_TYPES)}")
        images = (
            out
            if output_type == "latent"
            else self.image_processor.postprocess(self.decode_latents(out), output_type=output_type)
        )
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents [N,C,h,w] -> images [N,3,H,W] in [-1, 1] (fp32 for an fp16 ``force_upcast`` VAE)."""
        return decode_vae(self.vae, latents)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        truncation_psi: float = 1.0,
        **kwargs,
    ):
        """Generate ``len(prompt) * num_images_per_prompt`` images in one generator step.

        prompt / prompt_embeds: the text, or its encoding ``[N,L,D]`` (SDXL, SD3: with ``pooled_prompt_embeds``
        ``[N,P]``), as ``StableDiffusion(XL|3)Pipeline.encode_prompt`` returns them. height, width: default
        the student's training size. num_inference_steps: 1 (anything else is refused). guidance_scale:
        ignored (with a warning above 1): the teacher's guidance is distilled into the student.
        negative_prompt: refused (no classifier-free guidance). generator: one, or one per image.
        latents: unit-Gaussian noise ``[N,C,h,w]`` (the teacher's ``latents=`` input); drawn with
        ``generator`` when not given. output_type: ``pil``, ``np``, ``pt`` (images in [0, 1]) or
        ``latent`` (VAE-scaled latents). truncation_psi: style students only (StyleGAN-T §3.3): 1 = none,
        0 = the prompt's mean image; lower values trade variation for fidelity and text alignment.
        Other diffusers arguments (timesteps, eta, callbacks, ...) are refused with the reason.

        Examples:

        Returns: ``ImagePipelineOutput`` (``images``), or ``(images,)`` when ``return_dict`` is False.
        """
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            negative_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            output_type,
            num_images_per_prompt,
            unsupported=kwargs,
        )
        if prompt_embeds is not None:
            batch = prompt_embeds.shape[0] * num_images_per_prompt
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
            batch = len(prompts)
        if latents is not None and (height or width):
            given = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
            if (height or given[0], width or given[1]) != given:
                raise ValueError(
                    f"height x width {height}x{width} disagrees with latents of {given[0]}x{given[1]} px: pass one "
                    "of them"
                )
        noise = self._noise(latents, batch, generator, height, width)  # [N,C,h,w]
        if prompt_embeds is not None:
            cond = self._given_conditioning(prompt_embeds, pooled_prompt_embeds, num_images_per_prompt, noise)
        else:
            cond = self._conditioning(prompts, noise)
        extra = {}
        if truncation_psi != 1.0:
            self._style_student("truncation_psi")
            extra["truncation_psi"] = truncation_psi
        out = self.student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs(), **extra)  # [N,C,h,w]
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
        ends = self._noise(latents, 2, generator)
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
        if tuple(coarse_latents.shape) != tuple(fine_latents.shape):
            raise ValueError(
                f"coarse_latents {tuple(coarse_latents.shape)} and fine_latents {tuple(fine_latents.shape)} must "
                "have one shape"
            )
        coarse = self._noise(coarse_latents, len(prompts), None)
        fine = self._noise(fine_latents, len(prompts), None)
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
