"""GigaGAN generator (Kang et al., "Scaling up GANs for Text-to-Image Synthesis", CVPR 2023, §3).

Text branch -> (t_global, t_local); mapping M(z, t_global) -> w; a coarse-to-fine synthesis network
of style-modulated convs with sample-adaptive kernel selection (§3.2), self- and cross-attention
interleaved with the convs at low resolutions (§3.2), and a latent output at every level summed
StyleGAN2-"skip"-style. As a Diffusion2GAN student, z is not sampled: it is read from the teacher's
noise map, which also enters every level spatially.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ._layers import (
    CrossAttention, MappingNetwork, NoiseCode, NoiseInjection, StyledConv, TextConditioner,
    attention_heads, SkipGeneratorMixin, check_inputs, lrelu, norm_groups, pooled_from, size_preset,
)

PRESETS = {
    "tiny": dict(block_out_channels=(32, 16), layers_per_block=1, num_kernels=2, attention_head_dim=16, w_dim=32,
                 z_dim=16, noise_grid=2, text_dim=32, text_heads=2, mapping_layers=1, attention_levels=1),
    "small": dict(block_out_channels=(128, 64, 32), layers_per_block=2, num_kernels=4, attention_head_dim=32,
                  w_dim=256, z_dim=64, noise_grid=4, text_dim=128, text_heads=4, mapping_layers=2, attention_levels=2),
    "base": dict(block_out_channels=(512, 512, 256, 128), layers_per_block=2, num_kernels=4, attention_head_dim=64,
                 w_dim=512, z_dim=128, noise_grid=8, text_dim=512, text_heads=8, mapping_layers=4, attention_levels=2),
}


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
    """One resolution: noise injection, ``layers`` x [adaptive-kernel styled conv (+ self- and
    cross-attention when ``attend``)], and this level's to-latent output."""

    def __init__(self, in_channels: int, channels: int, *, latent_channels: int, w_dim: int, text_dim: int,
                 layers: int, num_kernels: int, attend: bool, head_dim: int, out_gain: float, first: bool):
        super().__init__()
        # The first level's injection is the network input (with the constant), so it must not start at 0.
        self.inject = NoiseInjection(latent_channels, in_channels, zero_init=not first)
        self.convs = nn.ModuleList(
            StyledConv(in_channels if j == 0 else channels, channels, w_dim, 3, num_kernels=num_kernels)
            for j in range(layers)
        )
        self.self_attn = nn.ModuleList(StyledSelfAttention(channels, w_dim, head_dim) for _ in range(layers if attend else 0))
        self.cross_attn = nn.ModuleList(CrossAttention(channels, text_dim, head_dim) for _ in range(layers if attend else 0))
        self.to_latent = StyledConv(channels, latent_channels, w_dim, 1, demodulate=False, init_gain=out_gain)

    def forward(self, x, noise, w, t_local):
        # x [N,I,h,w], noise [N,C,H,W], w [N,W], t_local [N,L,T] | None -> features [N,O,h,w], latent [N,C,h,w]
        x = self.inject(x, noise)
        for j, conv in enumerate(self.convs):
            x = lrelu(conv(x, w))
            if len(self.self_attn):
                x = self.cross_attn[j](self.self_attn[j](x, w), t_local)
        return x, self.to_latent(x, w)


class GigaGANGenerator(SkipGeneratorMixin, ModelMixin, ConfigMixin):
    """``forward(noise [N,C,H,W], prompt_embeds [N,L,D], added_cond_kwargs=None) -> latents [N,C,H,W]``.

    H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``. Levels whose side at
    ``sample_size`` is <= ``attention_resolution`` get self- and cross-attention. With
    ``pooled_dim > 0`` the SDXL pooled embedding ``added_cond_kwargs["text_embeds"]`` is required and
    joins t_global; SDXL's ``time_ids`` are ignored (the noise map already fixes the output size).
    """

    _supports_gradient_checkpointing = False

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
        mapping_layers: int = 2,
        out_gain: float = 0.1,
    ):
        super().__init__()
        num_levels = len(block_out_channels)
        if sample_size % 2 ** (num_levels - 1):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**(levels-1) = {2 ** (num_levels - 1)}")
        sides = [sample_size // 2 ** (num_levels - 1 - i) for i in range(num_levels)]
        attend = [side <= attention_resolution for side in sides]
        self.text = TextConditioner(cross_attention_dim, text_dim, text_heads, pooled_dim, local=any(attend))
        self.noise_code = NoiseCode(latent_channels, z_dim, noise_grid)
        self.mapping = MappingNetwork(z_dim + self.text.global_dim, w_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(block_out_channels[0], sides[0], sides[0]))
        self.levels = nn.ModuleList(
            GigaGANLevel(
                block_out_channels[max(i - 1, 0)], ch, latent_channels=latent_channels, w_dim=w_dim, text_dim=text_dim,
                layers=layers_per_block, num_kernels=num_kernels, attend=attend[i], head_dim=attention_head_dim,
                out_gain=out_gain, first=i == 0,
            )
            for i, ch in enumerate(block_out_channels)
        )

    @classmethod
    def for_latents(cls, *, latent_channels: int, sample_size: int, cross_attention_dim: int, pooled_dim: int = 0,
                    size: str = "small") -> "GigaGANGenerator":
        """Preset sizes: ``tiny`` (tests), ``small`` (digits testbed, CPU), ``base`` (SD-scale latents)."""
        preset = size_preset(PRESETS, size)
        levels = len(preset["block_out_channels"])
        # Attention on the coarsest ``attention_levels`` levels, whatever the latent size.
        preset["attention_resolution"] = sample_size // 2 ** (levels - preset.pop("attention_levels"))
        return cls(latent_channels=latent_channels, sample_size=sample_size, cross_attention_dim=cross_attention_dim,
                   pooled_dim=pooled_dim, **preset)

    def forward(
        self,
        noise: torch.Tensor,  # [N,C,H,W]
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:  # [N,C,H,W]
        check_inputs(self, noise, prompt_embeds)
        n, _, h, w = noise.shape
        t_global, t_local = self.text(prompt_embeds, pooled_from(self, added_cond_kwargs, n))
        style = self.mapping(torch.cat([self.noise_code(noise), t_global], dim=1))  # [N,W]
        factor = 2 ** (len(self.levels) - 1)
        x = self.const[None].to(noise.dtype)
        if tuple(x.shape[-2:]) != (h // factor, w // factor):
            # Other latent sizes: the learned constant is stretched like a positional map.
            x = F.interpolate(x, size=(h // factor, w // factor), mode="bilinear", align_corners=False)
        x = x.expand(n, -1, -1, -1)
        return self.synthesize(x, noise, style, t_local)
