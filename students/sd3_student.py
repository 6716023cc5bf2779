"""The Diffusion2GAN student for flow-matching teachers: the teacher's MMDiT evaluated once, at sigma = 1.

Diffusion2GAN §3 initialises the generator from the teacher's denoiser and reads it in the x0
parameterisation. For a rectified-flow teacher (SD3, Esser et al. 2024 §2) x_sigma = (1 - sigma) x0 +
sigma eps and the transformer predicts v = eps - x0, so x0 = x_sigma - sigma v. The teacher's ODE starts
at sigma = 1 from its input noise (the scheduler's first sigma is 1 whatever its shift, and SD3's pipeline
does not rescale ``latents=``), so the student reads the noise as x_1 and returns x0 = noise - v: at
initialisation the teacher's own one-step estimate. Unlike the UNet student at t = 999 (x0 amplifies the
UNet's rounding 14.6x), the conversion has gain 1, so the transformer may run under autocast.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config


class SD3TransformerStudent(ModelMixin, ConfigMixin):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs={"text_embeds": pooled [N,P]})
    -> latents [N,C,H,W]`` (the generator interface, with SD3's pooled text as SDXL's ``text_embeds``).

    sigma: the noise level the transformer is evaluated at (1 = the ODE's start, the paper's choice);
    num_train_timesteps: the scheduler's, which maps sigma to the transformer's timestep (sigma x 1000).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, transformer_config: dict | None = None, sigma: float = 1.0, num_train_timesteps: int = 1000):
        super().__init__()
        if not 0.0 < sigma <= 1.0:
            raise ValueError(
                f"sigma must be in (0, 1] (1: the ODE's start, where the noise is the teacher's input), got {sigma}"
            )
        self.transformer = SD3Transformer2DModel.from_config(transformer_config or {})

    @classmethod
    def from_teacher(
        cls, transformer: SD3Transformer2DModel, scheduler, *, sigma: float = 1.0
    ) -> "SD3TransformerStudent":
        """A student whose weights are a copy of the teacher ``transformer``; ``scheduler`` gives
        num_train_timesteps."""
        student = cls(
            transformer_config=dict(transformer.config),
            sigma=sigma,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )
        student.transformer.load_state_dict(transformer.state_dict())
        return student if transformer.dtype == torch.float32 else student.to(transformer.dtype)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def forward(
        self,
        noise: torch.Tensor,  # [N,C,H,W]
        prompt_embeds: torch.Tensor,  # [N,L,D] CLIP (+ T5) tokens
        added_cond_kwargs: dict | None = None,  # {"text_embeds": [N,P]} the pooled CLIP projections
    ) -> torch.Tensor:
        pooled = (added_cond_kwargs or {}).get("text_embeds")
        if pooled is None:
            raise ValueError(
                "an SD3 student needs the pooled prompt embedding: pass added_cond_kwargs={'text_embeds': [N,P]}"
            )
        cfg = self.config
        dtype = self.transformer.dtype
        # A float timestep sigma x num_train_timesteps, as StableDiffusion3Pipeline passes the scheduler's.
        t = torch.full((noise.shape[0],), cfg.sigma * cfg.num_train_timesteps, device=noise.device, dtype=torch.float32)
        v = self.transformer(
            hidden_states=noise.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=t,
        ).sample
        # Reading the noise as x_sigma: x0 = x_sigma - sigma v (exact at sigma = 1, where x_1 is the noise).
        x0 = noise.float() - cfg.sigma * v.float()
        return x0.to(noise.dtype)
