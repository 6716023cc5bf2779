"""StyleGAN-T generator (Sauer et al., "StyleGAN-T: Unlocking the Power of GANs for Fast Large-Scale
Text-to-Image Synthesis", ICML 2023, §3.1 and Fig. 3a-b).

A StyleGAN2 backbone without StyleGAN3's equivariance machinery: Fourier-feature input instead of a
learned constant, per-resolution blocks in which half the modulated convs are residual (GroupNorm on
the input, Layer Scale initialised to 1e-5 on the output), a to-latent layer per resolution whose
outputs are accumulated, and the text code bypassing the mapping network, w = [f(z), c_text],
turned into per-layer styles by the second-order affine of Eq. 1, s = s1 * s2 + s3.
As a Diffusion2GAN student, z is read from the teacher's noise map, which also enters every
resolution spatially (``_base.py``). Truncation (§3.3): the mean of f(z) is tracked during training
(``w_avg``); the text part of w is deterministic, so [w_avg, c_text] is the prompt's mean style.
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin  # noqa: F401  diffusers finds a saved component's loader by the base-class names in its module
from diffusers.configuration_utils import register_to_config
from torch import nn

from ._base import StyleGenerator, size_preset
from ._layers import CrossAttention, MappingNetwork, StyledConv, TextConditioner, lrelu, norm_groups, pixel_norm

PRESETS = {
    "tiny": dict(
        block_out_channels=(32, 16),
        layers_per_block=1,
        attention_head_dim=16,
        w_dim=32,
        z_dim=16,
        noise_grid=2,
        text_dim=32,
        text_heads=2,
        mapping_layers=2,
        fourier_channels=32,
    ),
    # Small images from scratch on a CPU (32-64 px in pixels): a 4x4 start, as GigaGAN's `lite`.
    "lite": dict(
        block_out_channels=(128, 64, 32, 16),
        layers_per_block=1,
        attention_head_dim=32,
        w_dim=128,
        z_dim=64,
        noise_grid=4,
        text_dim=128,
        text_heads=4,
        mapping_layers=2,
        fourier_channels=128,
    ),
    "small": dict(
        block_out_channels=(128, 64, 32),
        layers_per_block=2,
        attention_head_dim=32,
        w_dim=128,
        z_dim=64,
        noise_grid=4,
        text_dim=128,
        text_heads=4,
        mapping_layers=2,
        fourier_channels=128,
    ),
    "base": dict(
        block_out_channels=(512, 512, 256, 128),
        layers_per_block=2,
        attention_head_dim=64,
        w_dim=512,
        z_dim=64,
        noise_grid=8,
        text_dim=512,
        text_heads=8,
        mapping_layers=2,
        fourier_channels=512,
    ),
    # StyleGAN-T's full configuration (Table 4, "Full"): generator channel max 2048, 4 residual blocks per
    # generator block, z dimension 64, 1.02B generator parameters. Here the widths fall from the channel max to
    # 1024 over the four latent levels, which brings this generator to the published count (0.98B).
    "paper": dict(
        block_out_channels=(2048, 2048, 1024, 1024),
        layers_per_block=4,
        attention_head_dim=64,
        w_dim=512,
        z_dim=64,
        noise_grid=8,
        text_dim=512,
        text_heads=8,
        mapping_layers=2,
        fourier_channels=512,
    ),
}
PAPER_PARAMETERS = 1.02e9  # the published count the "paper" preset is sized to (tests check it within 10%)


class FourierInput(nn.Module):
    """Fixed random-frequency sinusoids on the coarse grid (Fig. 3a's replacement for the constant),
    then a learned 1x1 conv. Coordinates are in units of the default grid, so larger latents see a
    larger field of view rather than stretched features."""

    def __init__(self, channels: int, out_channels: int, grid: int, seed: int = 0):
        super().__init__()
        # Drawn on the CPU whatever the default device (``with torch.device("cuda")`` building included), so
        # the fixed frequencies are the same on every machine.
        gen = torch.Generator().manual_seed(seed)
        angle = torch.rand(channels, generator=gen, device="cpu") * 2 * math.pi
        # Radii up to the coarse grid's Nyquist rate (grid / 2 cycles per unit), uniform over the disk.
        radius = torch.rand(channels, generator=gen, device="cpu").sqrt() * grid / 2
        phases = torch.rand(channels, generator=gen, device="cpu")
        device = torch.get_default_device()  # then onto the device the module is being built on
        self.register_buffer(
            "freqs", (torch.stack([angle.cos(), angle.sin()], dim=1) * radius[:, None]).to(device)
        )  # [F,2]
        self.register_buffer("phases", phases.to(device))  # [F]
        self.grid = grid
        self.proj = nn.Conv2d(channels, out_channels, 1)

    def forward(self, n: int, h: int, w: int) -> torch.Tensor:  # -> [n,O,h,w]
        dev = self.freqs.device
        ys = (torch.arange(h, device=dev) + 0.5 - h / 2) / self.grid
        xs = (torch.arange(w, device=dev) + 0.5 - w / 2) / self.grid
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h,w,2] as (x, y)
        feats = torch.sin(2 * math.pi * (coords @ self.freqs.float().T + self.phases.float()))  # [h,w,F], fp32 phases
        feats = feats.permute(2, 0, 1)[None].to(self.proj.weight.dtype)
        return self.proj(feats).expand(n, -1, -1, -1)


class ResidualStyledConv(nn.Module):
    """§3.1 residual layer: ``x + layer_scale * lrelu(conv(GroupNorm(x), w))``; the 1e-5 layer scale
    fades the branch in, which the paper reports lets the generator grow deep without collapse."""

    def __init__(self, channels: int, w_dim: int, layer_scale_init: float):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.conv = StyledConv(channels, channels, w_dim, 3, style_order=2)
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [N,C,H,W], [N,W] -> [N,C,H,W]
        return x + self.layer_scale[None, :, None, None] * lrelu(self.conv(self.norm(x), w))


class StyleGANTLevel(nn.Module):
    """One resolution (Fig. 3b): ``layers`` x (plain styled conv, residual styled
    conv [, cross-attention]), and this resolution's to-latent output."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        latent_channels: int,
        w_dim: int,
        text_dim: int,
        layers: int,
        attend: bool,
        head_dim: int,
        layer_scale_init: float,
        out_gain: float,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            StyledConv(in_channels if j == 0 else channels, channels, w_dim, 3, style_order=2) for j in range(layers)
        )
        self.residuals = nn.ModuleList(ResidualStyledConv(channels, w_dim, layer_scale_init) for _ in range(layers))
        self.cross_attn = nn.ModuleList(
            CrossAttention(channels, text_dim, head_dim) for _ in range(layers if attend else 0)
        )
        self.to_latent = StyledConv(
            channels, latent_channels, w_dim, 1, style_order=2, demodulate=False, init_gain=out_gain
        )

    def forward(self, x, w, t_local):
        # x [N,I,h,w], w [N,W], t_local [N,L,T] | None -> features [N,O,h,w], latent [N,C,h,w]
        for j, (conv, residual) in enumerate(zip(self.convs, self.residuals)):
            x = residual(lrelu(conv(x, w)), w)
            if len(self.cross_attn):
                x = self.cross_attn[j](x, t_local)
        return x, self.to_latent(x, w)


class StyleGANTGenerator(StyleGenerator):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs=None, *, truncation_psi=1,
    return_pyramid=False) -> latents [N,C,H,W]``.

    H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``. Text reaches the styles as
    c_text = attention-pooled prompt tokens (plus SDXL's pooled ``text_embeds`` when
    ``pooled_dim > 0``; then it is required). Levels whose side at ``sample_size`` is <=
    ``attention_resolution`` also cross-attend to the tokens: an addition to the paper, whose generator
    sees text only through the styles (``attention_resolution=0`` gives exactly that design).
    """

    w_avg_beta = 0.995  # StyleGAN2's decay of the tracked mean of f(z), per training forward

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        sample_size: int = 64,
        cross_attention_dim: int = 768,
        pooled_dim: int = 0,
        block_out_channels: tuple[int, ...] = (256, 128, 64),
        layers_per_block: int = 2,
        attention_resolution: int = 0,
        attention_head_dim: int = 64,
        w_dim: int = 256,
        z_dim: int = 64,
        noise_grid: int = 4,
        text_dim: int = 256,
        text_heads: int = 4,
        mapping_layers: int = 2,
        mapping_lr_mul: float = 0.01,
        fourier_channels: int = 256,
        layer_scale_init: float = 1e-5,
        out_gain: float = 0.1,
        latent_mean: tuple[float, ...] | None = None,
        latent_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self._init_latent_affine(latent_channels, latent_mean, latent_std)
        sides = self._init_noise_path(
            latent_channels=latent_channels,
            sample_size=sample_size,
            block_out_channels=block_out_channels,
            z_dim=z_dim,
            noise_grid=noise_grid,
        )
        attend = [side <= attention_resolution for side in sides]
        self.text = TextConditioner(cross_attention_dim, text_dim, text_heads, pooled_dim, local=any(attend))
        self.mapping = MappingNetwork(
            z_dim, w_dim, mapping_layers, lr_mul=mapping_lr_mul
        )  # f(z): the text bypasses it (§3.1)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        style_dim = w_dim + self.text.global_dim
        self.input = FourierInput(fourier_channels, block_out_channels[0], sides[0])
        self.levels = nn.ModuleList(
            StyleGANTLevel(
                block_out_channels[max(i - 1, 0)],
                ch,
                latent_channels=latent_channels,
                w_dim=style_dim,
                text_dim=text_dim,
                layers=layers_per_block,
                attend=attend[i],
                head_dim=attention_head_dim,
                layer_scale_init=layer_scale_init,
                out_gain=out_gain,
            )
            for i, ch in enumerate(block_out_channels)
        )

    @classmethod
    def for_latents(
        cls,
        *,
        latent_channels: int,
        sample_size: int,
        cross_attention_dim: int,
        pooled_dim: int = 0,
        size: str = "small",
        **overrides,
    ) -> "StyleGANTGenerator":
        """Preset sizes: ``tiny`` (tests), ``lite`` (small images from scratch on a CPU), ``small`` (digits testbed,
        CPU), ``base`` (50 M parameters at SD latents), ``paper`` (the published generator's size, 0.98 B); all
        cross-attend on the coarsest level only."""
        preset = {**size_preset(PRESETS, size), **overrides}
        coarsest = sample_size // 2 ** (len(preset["block_out_channels"]) - 1)
        return cls(
            latent_channels=latent_channels,
            sample_size=sample_size,
            cross_attention_dim=cross_attention_dim,
            pooled_dim=pooled_dim,
            attention_resolution=coarsest,
            **preset,
        )

    def _style(self, z: torch.Tensor, c_text: torch.Tensor, psi: float) -> torch.Tensor:
        # z [N,Z], c_text [N,G] -> w = [f(z), c_text] [N,W+G]
        f = self.mapping(pixel_norm(z))
        if self.training and torch.is_grad_enabled():  # a training step: track E_z[f(z)] (StyleGAN2's w_avg)
            self.w_avg.copy_(f.detach().mean(dim=0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        if psi != 1.0:
            f = self.w_avg.to(f.dtype).lerp(f, psi)
        return torch.cat([f, c_text], dim=1)

    def _synthesis_input(self, n: int, h: int, w: int, dtype) -> torch.Tensor:
        return self.input(n, h, w).to(dtype)
