"""What the style-based GAN students (GigaGAN, StyleGAN-T) share: the generator interface, the noise
entry, truncation, style mixing and the multi-scale "skip" synthesis.

Generator interface (every student, the UNet one included): ``forward(noise [N,C,H,W],
prompt_embeds [N,L,D], added_cond_kwargs=None) -> latents [N,C,H,W]`` plus ``latent_channels`` and
``sample_size``. The style students add ``truncation_psi`` and ``return_pyramid`` to ``forward`` and
split it into ``encode`` (noise + text -> :class:`StyleCodes`) and ``synthesize`` (codes -> latents),
which is what truncation, latent interpolation and style mixing operate on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from ._layers import NoiseCode, NoiseInjection, upsample


def check_inputs(model, noise: torch.Tensor, prompt_embeds: torch.Tensor) -> None:
    """One-line ValueErrors for the mistakes a caller can make with the generator interface."""
    cfg = model.config
    if noise.ndim != 4 or noise.shape[1] != cfg.latent_channels:
        raise ValueError(f"noise must be [N,{cfg.latent_channels},H,W]; got {tuple(noise.shape)}")
    num_levels = len(cfg.block_out_channels)
    multiple = 2 ** (num_levels - 1)
    if noise.shape[-2] % multiple or noise.shape[-1] % multiple:
        raise ValueError(
            f"noise height and width must be divisible by {multiple} (2**(levels-1) for {num_levels} "
            f"levels); got {noise.shape[-2]}x{noise.shape[-1]}: use a latent side that is a multiple of {multiple}"
        )
    if (
        prompt_embeds.ndim != 3
        or prompt_embeds.shape[-1] != cfg.cross_attention_dim
        or prompt_embeds.shape[0] != noise.shape[0]
    ):
        raise ValueError(
            f"prompt_embeds must be [N={noise.shape[0]},L,{cfg.cross_attention_dim}]; got {tuple(prompt_embeds.shape)}"
        )


def pooled_from(model, added_cond_kwargs: dict | None, batch: int) -> torch.Tensor | None:
    """SDXL's pooled text embedding [N,P] when the model was built with ``pooled_dim > 0``, else None."""
    pooled_dim = model.config.pooled_dim
    if pooled_dim <= 0:
        return None
    pooled = (added_cond_kwargs or {}).get("text_embeds")
    if pooled is None or tuple(pooled.shape) != (batch, pooled_dim):
        got = None if pooled is None else tuple(pooled.shape)
        raise ValueError(
            f"this generator has pooled_dim={pooled_dim}: pass added_cond_kwargs={{'text_embeds': "
            f"[N={batch},{pooled_dim}]}}; "
            f"got {got}"
        )
    return pooled


def size_preset(presets: dict, size: str) -> dict:
    """A copy of the named size preset; a one-line error lists the sizes there are."""
    if size not in presets:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(presets)}")
    return dict(presets[size])


def check_truncation_psi(psi: float) -> float:
    psi = float(psi)
    if not 0.0 <= psi <= 1.0:
        raise ValueError(f"truncation_psi must be in [0, 1] (1 = no truncation, 0 = the prompt's mean); got {psi}")
    return psi


@dataclass
class StyleCodes:
    """What the synthesis network reads: the style ``w`` ([N,W], or [N,levels,W] after style mixing), the
    noise injected spatially ([N,C,H,W], or one map per level after style mixing) and the text tokens."""

    w: torch.Tensor
    noise: torch.Tensor | list[torch.Tensor]
    t_local: torch.Tensor | None

    def level_w(self, level: int) -> torch.Tensor:
        return self.w[:, level] if self.w.ndim == 3 else self.w

    def level_noise(self, level: int) -> torch.Tensor:
        return self.noise[level] if isinstance(self.noise, list) else self.noise

    def mix(self, other: "StyleCodes", crossover: int, num_levels: int) -> "StyleCodes":
        """Style mixing (StyleGAN §3.1): levels < ``crossover`` from ``self`` (coarse), the rest from ``other``."""
        if not 0 <= crossover <= num_levels:
            raise ValueError(f"crossover must be in [0, {num_levels}] (the number of levels); got {crossover}")
        pick = [self if i < crossover else other for i in range(num_levels)]
        return replace(
            self,
            w=torch.stack([c.level_w(i) for i, c in enumerate(pick)], dim=1),
            noise=[c.level_noise(i) for i, c in enumerate(pick)],
        )


class StyleGenerator(ModelMixin, ConfigMixin):
    """Base of :class:`GigaGANGenerator` and :class:`StyleGANTGenerator` (not a model by itself).

    Subclasses build ``self.levels`` (each ``level(x, w, t_local) -> (features, latent)``),
    ``self.text`` and the mapping, and implement ``_style(z, t_global, truncation_psi)`` and
    ``_synthesis_input(n, h, w, dtype)``. The teacher's noise map is the generator's z: pooled, it is
    the global code that the mapping network turns into w; area-resized, it is added to the synthesis
    features at every level (StyleGAN2's per-pixel noise inputs, here the teacher's own noise).
    """

    _supports_gradient_checkpointing = False

    def _init_noise_path(
        self, *, latent_channels: int, sample_size: int, block_out_channels, z_dim: int, noise_grid: int
    ) -> list[int]:
        """The noise code and the per-level injections; returns each level's side at ``sample_size``."""
        num_levels = len(block_out_channels)
        if sample_size % 2 ** (num_levels - 1):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**(levels-1) = {2 ** (num_levels - 1)}")
        self.noise_code = NoiseCode(latent_channels, z_dim, noise_grid)
        # Level i's input has level i-1's channels; the first injection is the network input with the
        # learned constant, so it must not start at zero.
        self.injections = nn.ModuleList(
            NoiseInjection(latent_channels, block_out_channels[max(i - 1, 0)], zero_init=i > 0)
            for i in range(num_levels)
        )
        return [sample_size // 2 ** (num_levels - 1 - i) for i in range(num_levels)]

    def _init_latent_affine(self, latent_channels: int, mean, std) -> None:
        """The output's per-channel scale and shift: the synthesis network works at unit scale and
        ``latents = out * latent_std + latent_mean`` (the target latents' measured statistics, given at
        construction; unset: 1 and 0). A teacher whose latents are not unit-scale then asks the last
        layer for no larger weights than one whose latents are (cf. EDM's sigma_data, SD's
        scaling_factor). Derived from the config, so not saved in the weights."""
        for name, values, default in (("latent_mean", mean, 0.0), ("latent_std", std, 1.0)):
            values = [default] * latent_channels if values is None else [float(v) for v in values]
            if len(values) != latent_channels:
                raise ValueError(f"{name} needs one value per latent channel ({latent_channels}); got {len(values)}")
            if name == "latent_std" and min(values) <= 0:
                raise ValueError(f"latent_std must be positive; got {values}")
            self.register_buffer(f"_{name}", torch.tensor(values).view(1, -1, 1, 1), persistent=False)

    def _to_latents(self, out: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] at unit scale -> latents [N,C,H,W]
        return out * self._latent_std.to(out.dtype) + self._latent_mean.to(out.dtype)

    def optimizer_param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups at ``lr`` in which the linear layers learn at the rate of the equalised ones.

        Adam moves each stored weight by about ``lr`` a step. The equalised layers (StyleGAN2 §B: the mapping
        network, the affines, the modulated convs) store unit-scale weights and scale them at run time, so
        ``lr`` is a small relative step for them; the plain ``nn.Linear`` layers (text transformer, attention,
        noise code) store He-scale weights, ~1/sqrt(fan-in), for which the same ``lr`` is 15 % of a weight per
        step at fan-in 512. Those get ``lr / sqrt(fan_in)``, what equalising them would give. The noise
        entry's convs keep ``lr``: zero-initialised, they carry the noise-to-latent map the regression learns
        first. Measured on a tiny SD-form teacher (docs/gan-students.md, "GAN students at SD scale"): one ``lr`` for all
        diverged (training MSE 20 -> 316 in 33 steps); the convs scaled too fell slower (held-out MSE 20.7 ->
        10.5, against 2.9). Biases, norms, layer scales and learned maps keep ``lr``."""
        by_fan_in: dict[int, list] = {}
        rest = []
        for module in self.modules():
            plain = isinstance(module, nn.Linear)
            for p in module.parameters(recurse=False):
                if plain and p.ndim >= 2:
                    by_fan_in.setdefault(p[0].numel(), []).append(p)
                else:
                    rest.append(p)
        groups = [{"params": rest, "lr": lr}]
        groups += [{"params": ps, "lr": lr / fan_in**0.5} for fan_in, ps in sorted(by_fan_in.items())]
        return groups

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def sample_size(self) -> int:
        return int(self.config.sample_size)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def encode(
        self,
        noise: torch.Tensor,  # [N,C,H,W]
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,
        *,
        truncation_psi: float = 1.0,
    ) -> StyleCodes:
        """Noise + text -> style codes. ``truncation_psi`` < 1 pulls w towards the prompt's mean style
        and the injected noise towards its mean, zero (StyleGAN-T §3.3; the injections are linear)."""
        check_inputs(self, noise, prompt_embeds)
        psi = check_truncation_psi(truncation_psi)
        t_global, t_local = self.text(prompt_embeds, pooled_from(self, added_cond_kwargs, noise.shape[0]))
        w = self._style(self.noise_code(noise), t_global, psi)
        return StyleCodes(w=w, noise=noise if psi == 1.0 else noise * psi, t_local=t_local)

    def synthesize(self, codes: StyleCodes, *, return_pyramid: bool = False):
        """Codes -> latents [N,C,H,W] (StyleGAN2 "skip" synthesis: each level's latent output is
        upsampled and summed). ``return_pyramid``: also the running sum at every level, coarse -> fine
        (GigaGAN's image pyramid for a multi-scale discriminator; the last entry is the output)."""
        n, _, h, w = codes.level_noise(0).shape
        factor = 2 ** (self.num_levels - 1)
        x = self._synthesis_input(n, h // factor, w // factor, codes.level_noise(0).dtype)
        out, pyramid = None, []
        for i, level in enumerate(self.levels):
            x = self.injections[i](upsample(x) if i else x, codes.level_noise(i))
            x, y = level(x, codes.level_w(i), codes.t_local)
            out = y if out is None else upsample(out) + y
            pyramid.append(out)
        if return_pyramid:
            return self._to_latents(out), [self._to_latents(level) for level in pyramid]
        return self._to_latents(out)

    def forward(
        self,
        noise: torch.Tensor,  # [N,C,H,W]
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,
        *,
        truncation_psi: float = 1.0,
        return_pyramid: bool = False,
    ):
        """-> latents [N,C,H,W] (with ``return_pyramid``: (latents, [per-level latents, coarse -> fine]))."""
        codes = self.encode(noise, prompt_embeds, added_cond_kwargs, truncation_psi=truncation_psi)
        return self.synthesize(codes, return_pyramid=return_pyramid)

    def _stretch(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # Other latent sizes: a learned coarse map is stretched like a positional map.
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x
