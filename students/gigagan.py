"""GigaGAN generator (Kang et al., "Scaling up GANs for Text-to-Image Synthesis", CVPR 2023, §3).

Text branch -> (t_global, t_local) (§3.1: learned transformer layers on the frozen encoder's tokens);
mapping M(z, t_global) -> w; a coarse-to-fine synthesis network of style-modulated convs with
sample-adaptive kernel selection (§3.2), self- and cross-attention interleaved with the convs at low
resolutions (§3.2), and a latent output at every level summed StyleGAN2-"skip"-style (the running
sums are GigaGAN's image pyramid, returned on request). As a Diffusion2GAN student, z is not sampled:
it is read from the teacher's noise map, which also enters every level spatially (``_base.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  diffusers finds a saved component's loader by the base-class names in its module
from diffusers.configuration_utils import register_to_config
from torch import nn

from ._base import StyleGenerator, size_preset
from ._layers import (
    CrossAttention,
    MappingNetwork,
    StyledConv,
    TextTransformer,
    attention_heads,
    lrelu,
    norm_groups,
    pixel_norm,
)

PRESETS = {
    "tiny": dict(
        block_out_channels=(32, 16),
        layers_per_block=1,
        num_kernels=2,
        attention_head_dim=16,
        w_dim=32,
        z_dim=16,
        noise_grid=2,
        text_dim=32,
        text_heads=2,
        text_layers=1,
        mapping_layers=2,
        attention_levels=1,
    ),
    # Small images from scratch on a CPU (the digits' from-scratch recipe, 32-64 px in pixels): a 4x4 start, one kernel
    # per conv and no attention: the recipe met every from-scratch target on the digits without them
    # (docs/from-scratch.md); the kernel bank and attention are left to the GPU-sized presets.
    "lite": dict(
        block_out_channels=(128, 64, 32, 16),
        layers_per_block=2,
        num_kernels=1,
        attention_head_dim=32,
        w_dim=256,
        z_dim=64,
        noise_grid=4,
        text_dim=128,
        text_heads=4,
        text_layers=2,
        mapping_layers=2,
        attention_levels=0,
    ),
    "small": dict(
        block_out_channels=(128, 64, 32),
        layers_per_block=2,
        num_kernels=4,
        attention_head_dim=32,
        w_dim=256,
        z_dim=64,
        noise_grid=4,
        text_dim=128,
        text_heads=4,
        text_layers=2,
        mapping_layers=2,
        attention_levels=2,
    ),
    "base": dict(
        block_out_channels=(512, 512, 256, 128),
        layers_per_block=2,
        num_kernels=4,
        attention_head_dim=64,
        w_dim=512,
        z_dim=128,
        noise_grid=8,
        text_dim=512,
        text_heads=8,
        text_layers=4,
        mapping_layers=4,
        attention_levels=2,
    ),
    # GigaGAN's published text-to-image generator: 1.0B parameters (GigaGAN, Table 2 and abstract: the
    # "1B-parameter GigaGAN"); 0.97B here. The paper's design kept: a bank of 8 kernels per conv (§3.2: most of
    # the parameters, little of the compute), self- and cross-attention at every level but the finest (§3.2),
    # a 4-layer text transformer (§3.1). The split into widths and depth is ours, sized for SD's latents.
    "paper": dict(
        block_out_channels=(1024, 1024, 1024, 768),
        layers_per_block=3,
        num_kernels=8,
        attention_head_dim=64,
        w_dim=1024,
        z_dim=128,
        noise_grid=8,
        text_dim=1024,
        text_heads=16,
        text_layers=4,
        mapping_layers=4,
        attention_levels=3,
    ),
}
PAPER_PARAMETERS = 1.0e9  # the published count the "paper" preset is sized to (tests check it within 10%)


class StyledSelfAttention(nn.Module):
    """Self-attention over feature pixels (§3.2): L2-distance logits with a shared query/key
    projection (the Lipschitz-friendly form GigaGAN adopts for stability), the style w as one extra
    key/value token; pre-norm, residual, zero-initialised output so the block fades in."""

    def __init__(self, channels: int, w_dim: int, head_dim: int):
        super().__init__()
        self.heads = attention_heads(channels, head_dim)
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.w_token = nn.Linear(w_dim, channels)
        self.qk = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [N,C,H,W], [N,W] -> [N,C,H,W]
        n, c, h, wd = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N,HW,C]
        context = torch.cat([tokens, self.w_token(w)[:, None]], dim=1)  # [N,HW+1,C]
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.qk(tokens)), split(self.qk(context)), split(self.v(context))
        d = q.shape[-1]
        # -|q-k|^2/sqrt(d) = (2 q.k - |k|^2 - |q|^2)/sqrt(d); |q|^2 is constant along the softmax axis.
        bias = -k.square().sum(-1)[:, :, None, :] / math.sqrt(d)  # [N,h,1,HW+1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=2.0 / math.sqrt(d))
        return x + self.out(y.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(n, c, h, wd)


class GigaGANLevel(nn.Module):
    """One resolution: ``layers`` x [adaptive-kernel styled conv (+ self- and cross-attention when
    ``attend``)], and this level's to-latent output."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        latent_channels: int,
        w_dim: int,
        text_dim: int,
        layers: int,
        num_kernels: int,
        attend: bool,
        head_dim: int,
        out_gain: float,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            StyledConv(in_channels if j == 0 else channels, channels, w_dim, 3, num_kernels=num_kernels)
            for j in range(layers)
        )
        self.self_attn = nn.ModuleList(
            StyledSelfAttention(channels, w_dim, head_dim) for _ in range(layers if attend else 0)
        )
        self.cross_attn = nn.ModuleList(
            CrossAttention(channels, text_dim, head_dim) for _ in range(layers if attend else 0)
        )
        self.to_latent = StyledConv(channels, latent_channels, w_dim, 1, demodulate=False, init_gain=out_gain)

    def forward(self, x, w, t_local):
        # x [N,I,h,w], w [N,W], t_local [N,L,T] | None -> features [N,O,h,w], latent [N,C,h,w]
        for j, conv in enumerate(self.convs):
            x = lrelu(conv(x, w))
            if len(self.self_attn):
                x = self.cross_attn[j](self.self_attn[j](x, w), t_local)
        return x, self.to_latent(x, w)


class GigaGANGenerator(StyleGenerator):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs=None, *, truncation_psi=1,
    return_pyramid=False) -> latents [N,C,H,W]``.

    H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``. Levels whose side at
    ``sample_size`` is <= ``attention_resolution`` get self- and cross-attention. With
    ``pooled_dim > 0`` the SDXL pooled embedding ``added_cond_kwargs["text_embeds"]`` is required and
    joins t_global; SDXL's ``time_ids`` are ignored (the noise map already fixes the output size).

    Truncation: the text enters the mapping network here, so the mean style differs per prompt and is
    not one tracked vector; it is computed when asked for, as the mean of M(z, t_global) over
    ``truncation_samples`` fixed noise maps (deterministic, a few mapping-network calls).
    """

    truncation_samples = 256

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        sample_size: int = 64,
        cross_attention_dim: int = 768,
        pooled_dim: int = 0,
        block_out_channels: tuple[int, ...] = (256, 128, 64),
        layers_per_block: int = 2,
        num_kernels: int = 4,
        attention_resolution: int = 16,
        attention_head_dim: int = 64,
        w_dim: int = 512,
        z_dim: int = 128,
        noise_grid: int = 4,
        text_dim: int = 256,
        text_heads: int = 4,
        text_layers: int = 2,
        mapping_layers: int = 2,
        mapping_lr_mul: float = 0.01,
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
        self.text = TextTransformer(cross_attention_dim, text_dim, text_heads, text_layers, pooled_dim)
        self.mapping = MappingNetwork(z_dim + self.text.global_dim, w_dim, mapping_layers, lr_mul=mapping_lr_mul)
        self.const = nn.Parameter(torch.randn(block_out_channels[0], sides[0], sides[0]))
        self.levels = nn.ModuleList(
            GigaGANLevel(
                block_out_channels[max(i - 1, 0)],
                ch,
                latent_channels=latent_channels,
                w_dim=w_dim,
                text_dim=text_dim,
                layers=layers_per_block,
                num_kernels=num_kernels,
                attend=attend[i],
                head_dim=attention_head_dim,
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
    ) -> "GigaGANGenerator":
        """Preset sizes: ``tiny`` (tests), ``lite`` (small images from scratch on a CPU), ``small`` (digits testbed,
        CPU),
        ``base`` (72 M parameters at SD latents), ``paper`` (the published generator's size, 0.97 B)."""
        preset = {**size_preset(PRESETS, size), **overrides}
        levels = len(preset["block_out_channels"])
        # Attention on the coarsest ``attention_levels`` levels, whatever the latent size.
        preset["attention_resolution"] = sample_size // 2 ** (levels - preset.pop("attention_levels"))
        return cls(
            latent_channels=latent_channels,
            sample_size=sample_size,
            cross_attention_dim=cross_attention_dim,
            pooled_dim=pooled_dim,
            **preset,
        )

    def _style(self, z: torch.Tensor, t_global: torch.Tensor, psi: float) -> torch.Tensor:
        # z [N,Z], t_global [N,G] -> w [N,W]; GigaGAN feeds M the concatenated codes, each normalised.
        w = self.mapping(torch.cat([pixel_norm(z), t_global], dim=1))
        return w if psi == 1.0 else self.mean_style(t_global).lerp(w, psi)

    def mean_style(self, t_global: torch.Tensor) -> torch.Tensor:
        """E_z[M(z, t_global)] per prompt [N,W], over ``truncation_samples`` fixed unit-Gaussian noise maps."""
        gen = torch.Generator().manual_seed(0)
        side = self.sample_size
        noise = torch.randn(self.truncation_samples, self.latent_channels, side, side, generator=gen, device="cpu")
        z = pixel_norm(self.noise_code(noise.to(t_global.device, t_global.dtype)))  # [K,Z]
        n, k = t_global.shape[0], z.shape[0]
        codes = torch.cat([z[None].expand(n, -1, -1), t_global[:, None].expand(-1, k, -1)], dim=-1)
        return self.mapping(codes.flatten(0, 1)).view(n, k, -1).mean(dim=1)

    def _synthesis_input(self, n: int, h: int, w: int, dtype) -> torch.Tensor:
        return self._stretch(self.const[None].to(dtype), h, w).expand(n, -1, -1, -1)
