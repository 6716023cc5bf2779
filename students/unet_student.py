"""The Diffusion2GAN student: the teacher's UNet evaluated once, at a fixed timestep, on the noise.

Diffusion2GAN §3 initialises the generator from the teacher UNet. Its output is read in the
x0 ("sample") parameterisation at ``timestep`` (999 by default): at initialisation the student
already returns the teacher's own one-step denoised estimate, and training only has to sharpen it.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config


class UNetStudent(ModelMixin, ConfigMixin):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs=None) -> latents [N,C,H,W]``."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict | None = None,
        timestep: int = 999,
        alpha_cumprod: float = 0.0047,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose epsilon, v_prediction or sample")
        self.unet = UNet2DConditionModel.from_config(unet_config or {})

    @classmethod
    def from_teacher(cls, unet: UNet2DConditionModel, scheduler, *, timestep: int = 999) -> "UNetStudent":
        """A student whose weights are a copy of the teacher ``unet``; ``scheduler`` gives alpha-bar(t)."""
        alpha = float(scheduler.alphas_cumprod[timestep])
        student = cls(
            unet_config=dict(unet.config), timestep=timestep, alpha_cumprod=alpha,
            prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        )
        student.unet.load_state_dict(unet.state_dict())
        return student if unet.dtype == torch.float32 else student.to(unet.dtype)

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
        cfg = self.config
        t = torch.full((noise.shape[0],), cfg.timestep, device=noise.device, dtype=torch.long)
        out = self.unet(noise, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
        a, s = cfg.alpha_cumprod**0.5, (1 - cfg.alpha_cumprod) ** 0.5
        # The teacher's latent at t=T is its input noise (init_noise_sigma = 1 for DDIM-type schedules).
        if cfg.prediction_type == "epsilon":
            return (noise - s * out) / a
        if cfg.prediction_type == "v_prediction":
            return a * noise - s * out
        return out
