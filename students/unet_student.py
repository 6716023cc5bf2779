"""The Diffusion2GAN student: the teacher's UNet evaluated once, at a fixed timestep, on the noise.

Diffusion2GAN §3 initialises the generator from the teacher UNet. Its output is read in the
x0 ("sample") parameterisation at ``timestep`` (999 by default): at initialisation the student
already returns the teacher's own one-step denoised estimate, and training only has to sharpen it.

Precision: for an epsilon teacher x0 = (z - sqrt(1 - abar) eps) / sqrt(abar), and sqrt(abar(999)) is
0.068 for the SD schedules, so the UNet's rounding error reaches x0 amplified 14.6x. Measured on the
tiny SD-form student (RMS difference to fp32 in latent units, with the UNet's eps scaled to the unit
RMS a trained UNet has at t = 999; the raw random init, eps RMS 0.32, gives a third of each):
bf16 autocast 0.19; bf16 with the output convs and the conversion in fp32 0.18; bf16 with the last
up block too 0.12; fp16 autocast 0.024; fp32 with TF32 matmuls/convs (simulated) 0.016; IEEE fp32 0.
Only fp32 keeps the error under 0.01, so ``precision="fp32"`` (the default) runs the UNet in fp32
with autocast off and TF32 off during the forward, however the rest of training (D, E-LatentLPIPS)
is cast. The price is the student's forward at fp32 speed on GPUs; ``precision="tf32"`` keeps tensor
cores for 0.016 error, ``"autocast"`` restores the old behaviour.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

PRECISIONS = ("fp32", "tf32", "autocast")
# Zero-terminal-SNR schedules (Lin et al. 2024, rescale_betas_zero_snr) end at abar = 0; diffusers'
# Euler / DPM-Solver store 2**-24 there instead so that sigma stays finite.
ZERO_SNR_ALPHA = 2.0**-24


@contextlib.contextmanager
def _ieee_fp32():
    """cuDNN convs default to TF32 on Ampere+ GPUs (10-bit mantissa, like fp16): off for this block."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


class UNetStudent(ModelMixin, ConfigMixin):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs=None) -> latents [N,C,H,W]``.

    precision: ``fp32`` (default) runs the UNet in its weights' dtype with autocast and TF32 off;
    ``tf32`` the same with TF32 left as the global setting (faster on GPUs, see the module docstring);
    ``autocast`` follows an enclosing autocast (bf16: 0.19 RMS error in x0). The x0 conversion is in
    fp32 in every case.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict | None = None,
        timestep: int = 999,
        alpha_cumprod: float = 0.0047,
        prediction_type: str = "epsilon",
        precision: str = "fp32",
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose epsilon, v_prediction or sample")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if prediction_type == "epsilon" and alpha_cumprod <= ZERO_SNR_ALPHA:
            # x0 = (z - eps) / 0: pure noise carries no x0, and an epsilon UNet cannot predict one there.
            raise ValueError(
                f"the teacher's schedule has zero terminal SNR (alpha_bar({timestep}) = {alpha_cumprod:.3g}), so an "
                "epsilon-prediction UNet gives no x0 there: distil a v-prediction teacher (zero-SNR schedules need one)"
            )
        self.unet = UNet2DConditionModel.from_config(unet_config or {})

    @classmethod
    def from_teacher(
        cls, unet: UNet2DConditionModel, scheduler, *, timestep: int = 999, precision: str = "fp32"
    ) -> "UNetStudent":
        """A student whose weights are a copy of the teacher ``unet``; ``scheduler`` gives alpha-bar(t)."""
        alpha = float(scheduler.alphas_cumprod[timestep])
        student = cls(
            unet_config=dict(unet.config),
            timestep=timestep,
            alpha_cumprod=alpha,
            prediction_type=scheduler.config.get("prediction_type", "epsilon"),
            precision=precision,
        )
        student.unet.load_state_dict(unet.state_dict())
        return student if unet.dtype == torch.float32 else student.to(unet.dtype)

    @classmethod
    def around(
        cls,
        unet: UNet2DConditionModel,
        *,
        timestep: int,
        alpha_cumprod: float,
        prediction_type: str,
        precision: str = "fp32",
    ) -> "UNetStudent":
        """A student whose UNet is ``unet`` itself (not copied; no weights are initialised: a LoRA student merged into a
        copy of its base, ``students/lora.py``)."""
        with torch.device("meta"):  # the placeholder UNet the config builds is replaced at once
            student = cls(
                unet_config=dict(unet.config),
                timestep=timestep,
                alpha_cumprod=alpha_cumprod,
                prediction_type=prediction_type,
                precision=precision,
            )
        student.unet = unet
        return student

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Default latent side (the generator interface: ``latent_channels``, ``sample_size``, ``forward``)."""
        return int(self.unet.config.sample_size)

    def forward(
        self,
        noise: torch.Tensor,  # [N,C,H,W]
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        return unet_x0(self.unet, noise, prompt_embeds, added_cond_kwargs, config=self.config, dtype=self.unet.dtype)


def unet_x0(
    unet,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    added_cond_kwargs: dict | None,
    *,
    config,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The one-step student's output: ``unet`` (any callable with the UNet's signature) at ``config.timestep`` on the
    noise, read as x0 (``config``: timestep, alpha_cumprod, prediction_type, precision; ``dtype``: the UNet's
    weights')."""
    cfg = config
    t = torch.full((noise.shape[0],), cfg.timestep, device=noise.device, dtype=torch.long)
    if cfg.precision == "autocast":
        out = unet(noise, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
    else:
        added = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (added_cond_kwargs or {}).items()}
        # Only the forward: the backward (and a checkpointing recompute) follow the global settings,
        # which adds noise to the gradients, not to the output.
        with (
            torch.autocast(noise.device.type, enabled=False),
            _ieee_fp32() if cfg.precision == "fp32" else contextlib.nullcontext(),
        ):
            out = unet(
                noise.to(dtype),
                t,
                encoder_hidden_states=prompt_embeds.to(dtype),
                added_cond_kwargs=added if added_cond_kwargs is not None else None,
            ).sample
    z, out = noise.float(), out.float()
    a, s = cfg.alpha_cumprod**0.5, (1 - cfg.alpha_cumprod) ** 0.5
    # The teacher's latent at t=T is its input noise (init_noise_sigma = 1 for DDIM-type schedules).
    if cfg.prediction_type == "epsilon":
        x0 = (z - s * out) / a
    elif cfg.prediction_type == "v_prediction":
        x0 = a * z - s * out  # finite at zero terminal SNR too: abar = 0 gives x0 = -v
    else:
        x0 = out
    return x0.to(noise.dtype)
