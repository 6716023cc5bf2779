"""Building blocks shared by the GAN students (``gigagan.py``, ``stylegan_t.py``).

Written from the papers' descriptions: ProGAN (Karras et al., ICLR 2018, §4.1 equalised learning
rate), StyleGAN (§2 mapping network, truncation), StyleGAN2 (Karras et al., CVPR 2020, §2.2 weight
demodulation), GigaGAN (Kang et al., CVPR 2023, §3.1 text branch, §3.2 adaptive kernels) and
StyleGAN-T (Sauer et al., ICML 2023, §3.1 second-order styles).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    # The sqrt(2) gain keeps unit second moment through the activation, so demodulated layers stay O(1).
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + eps)


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def attention_heads(channels: int, head_dim: int) -> int:
    """About ``channels / head_dim`` heads, rounded down to a divisor of ``channels``."""
    return norm_groups(channels, max(1, channels // head_dim))


def resize_noise(noise: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-downsample unit noise [N,C,H,W] to ``size``, rescaled so every pixel stays unit-variance."""
    if tuple(noise.shape[-2:]) == tuple(size):
        return noise
    factor = noise.shape[-2] // size[0]
    return F.avg_pool2d(noise, factor) * factor  # mean of factor**2 iid unit Gaussians has std 1/factor


class EqualLinear(nn.Module):
    """Fully connected layer with an equalised learning rate (ProGAN §4.1; StyleGAN's mapping and affines).

    The stored weight is N(0, 1 / lr_mul^2) and is scaled at run time by ``lr_mul / sqrt(in_features)``
    (the bias by ``lr_mul``), so the effective weight has He scale while Adam, whose steps are about
    ``lr`` per stored parameter, moves every layer at the same rate relative to its scale, times
    ``lr_mul``: StyleGAN trains its mapping network at ``lr_mul = 0.01``.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        bias = self.bias * self.bias_gain if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_gain, bias)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv (§2.2) with GigaGAN's bank of ``num_kernels`` kernels (§3.2).

    The per-sample kernel is ``sum_k p_k W_k`` scaled by the styles. Two exact evaluations: on small
    maps (< ``per_sample_min_pixels``) convolve with all K kernels at once and mix the outputs by
    ``p`` (conv is linear in the kernel; the demodulation norm of the mixed kernel comes from the
    bank's Gram matrix), which avoids slow grouped convs; on larger maps, where K convolutions cost
    more than building N kernels, materialise the per-sample kernels and run one grouped conv.
    """

    per_sample_min_pixels = 64

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        num_kernels: int = 1,
        demodulate: bool = True,
        init_gain: float = 1.0,
    ):
        super().__init__()
        self.demodulate = demodulate
        self.padding = kernel_size // 2
        # Equalised learning rate (ProGAN §4.1): unit-variance storage, fan-in scale at run time.
        self.weight = nn.Parameter(
            torch.randn(num_kernels, out_channels, in_channels, kernel_size, kernel_size) * init_gain
        )
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, styles: torch.Tensor, kernel_probs: torch.Tensor | None = None) -> torch.Tensor:
        # x [N,I,H,W], styles [N,I], kernel_probs [N,K] (rows sum to 1) -> [N,O,H,W]
        k, o, i = self.weight.shape[:3]
        weight = self.weight * self.scale
        if k > 1 and x.shape[-2] * x.shape[-1] >= self.per_sample_min_pixels:
            return self._per_sample(x, weight, styles, kernel_probs)
        y = F.conv2d(x * styles[:, :, None, None], weight.reshape(k * o, i, *weight.shape[-2:]), padding=self.padding)
        n, _, h, w = y.shape
        if k > 1:
            y = torch.einsum("nk,nkohw->nohw", kernel_probs, y.view(n, k, o, h, w))
        if self.demodulate:
            gram = (weight[:, None] * weight[None]).sum((-2, -1))  # [K,K,O,I]; einsum would run O*I tiny matmuls
            probs = kernel_probs if k > 1 else y.new_ones(n, 1)
            energy = torch.einsum("nk,nl,kloi,ni->no", probs, probs, gram, styles.square())
            y = y * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return y + self.bias[None, :, None, None]

    def _per_sample(self, x, weight, styles, kernel_probs):
        n, i, h, w = x.shape
        kernels = torch.einsum("nk,koiab->noiab", kernel_probs, weight) * styles[:, None, :, None, None]  # [N,O,I,k,k]
        if self.demodulate:
            kernels = kernels * torch.rsqrt(kernels.square().sum((2, 3, 4), keepdim=True) + 1e-8)
        y = F.conv2d(x.reshape(1, n * i, h, w), kernels.flatten(0, 1), padding=self.padding, groups=n)
        return y.view(n, -1, h, w) + self.bias[None, :, None, None]


class StyledConv(nn.Module):
    """Affine(w) -> styles -> modulated conv.

    ``style_order=1``: StyleGAN2 styles ``s = A(w)``. ``style_order=2``: StyleGAN-T Eq. 1,
    ``s = s1 * s2 + s3`` from one affine split in three (a second-order polynomial in w).
    ``num_kernels > 1``: GigaGAN adaptive kernel selection, ``softmax(A_k(w))`` mixes the bank.
    The affines are equalised (StyleGAN2), so Adam moves them at the rate of the convs they modulate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 3,
        *,
        num_kernels: int = 1,
        style_order: int = 1,
        demodulate: bool = True,
        init_gain: float = 1.0,
    ):
        super().__init__()
        if style_order not in (1, 2):
            raise ValueError(f"style_order must be 1 or 2; got {style_order}")
        self.style_order = style_order
        self.in_channels = in_channels
        # Styles start around 1 (s1 = s2 = 1, s3 = 0 for order 2): every layer starts near a plain conv.
        self.affine = EqualLinear(w_dim, in_channels * (3 if style_order == 2 else 1), bias_init=1.0)
        if style_order == 2:
            with torch.no_grad():
                self.affine.bias[2 * in_channels :] = 0.0
        self.select = EqualLinear(w_dim, num_kernels) if num_kernels > 1 else None
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_kernels, demodulate, init_gain)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x [N,I,H,W], w [N,W] -> [N,O,H,W]
        s = self.affine(w)
        if self.style_order == 2:
            s1, s2, s3 = s.chunk(3, dim=1)
            s = s1 * s2 + s3
        probs = self.select(w).softmax(dim=1) if self.select is not None else None
        return self.conv(x, s, probs)


class MappingNetwork(nn.Module):
    """StyleGAN mapping MLP (§2): ``num_layers`` equalised linears at ``lr_mul`` (0.01 in StyleGAN),
    lrelu between them and a linear last layer, so w is not confined to the lrelu's range.

    The input is the concatenation of the caller's (already normalised) codes.
    """

    def __init__(self, in_dim: int, w_dim: int, num_layers: int, *, lr_mul: float = 0.01):
        super().__init__()
        dims = [in_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,in] -> [N,W]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = lrelu(x)
        return x


class NoiseCode(nn.Module):
    """Global code z [N,Z] from the noise map: area-pool to ``grid`` x ``grid``, learned projection.

    The coarse structure of a diffusion sample is set by the low frequencies of its initial noise, so
    a pooled summary is what the mapping network needs; the finer detail enters through
    :class:`NoiseInjection` at every level. (Tried on the digits testbed: reading the full-resolution
    noise through a strided conv encoder, or unshuffled into channels, learned the ODE map slower.)
    """

    def __init__(self, channels: int, z_dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(channels * grid * grid, z_dim)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] -> [N,Z]
        return self.proj(F.adaptive_avg_pool2d(noise, self.grid).flatten(1))


class NoiseInjection(nn.Module):
    """Adds the noise, area-resized to the features' resolution, through a 3x3 conv; zero-initialised
    (``zero_init``) so that a new path starts as a no-op and fades in. Linear in the noise, so scaling
    the noise by psi is exactly the truncation trick on what it adds (the mean over noise is the bias)."""

    def __init__(self, noise_channels: int, channels: int, zero_init: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(noise_channels, channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:  # [N,Ch,h,w], [N,C,H,W] -> [N,Ch,h,w]
        return x + self.conv(resize_noise(noise, tuple(x.shape[-2:])))


class TextConditioner(nn.Module):
    """StyleGAN-T's text code: ``c_text`` from learned attention pooling over the frozen encoder's
    tokens (one learned query; the paper feeds CLIP's pooled embedding, which the SD conditioning
    does not carry), concatenated with a projection of SDXL's pooled embedding when ``pooled_dim > 0``;
    ``t_local`` a learned linear of the tokens for the optional cross-attention.
    """

    def __init__(self, context_dim: int, text_dim: int, heads: int, pooled_dim: int = 0, local: bool = True):
        super().__init__()
        if text_dim % heads:
            raise ValueError(f"text_dim {text_dim} must be divisible by text_heads {heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, text_dim) / math.sqrt(text_dim))
        self.kv = nn.Linear(context_dim, 2 * text_dim)
        self.out = nn.Linear(text_dim, text_dim)
        self.pooled = nn.Linear(pooled_dim, text_dim) if pooled_dim > 0 else None
        self.local = nn.Linear(context_dim, text_dim) if local else None
        self.global_dim = text_dim * (2 if pooled_dim > 0 else 1)

    def forward(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None):
        # prompt_embeds [N,L,D], pooled [N,P] -> t_global [N,G], t_local [N,L,T] | None
        n = prompt_embeds.shape[0]
        k, v = self.kv(prompt_embeds).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [N,h,L,d]
        q = split(self.query.expand(n, -1, -1).to(prompt_embeds.dtype))
        pooled_tokens = F.scaled_dot_product_attention(q, split(k), split(v))  # [N,h,1,d]
        t_global = pixel_norm(self.out(pooled_tokens.transpose(1, 2).flatten(2)[:, 0]))
        if self.pooled is not None:
            t_global = torch.cat([t_global, pixel_norm(self.pooled(pooled))], dim=1)
        t_local = self.local(prompt_embeds) if self.local is not None else None
        return t_global, t_local


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU MLP block. Written out rather than ``nn.TransformerEncoderLayer``,
    whose inference fast path gives other rounding in eval mode than in training: a saved student
    must reproduce, bit for bit, what it computed during validation."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,L,D] -> [N,L,D]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """GigaGAN's text branch (§3.1): learned transformer layers T on top of the frozen encoder's tokens.

    ``t = T(E_txt(c))``; GigaGAN reads ``t_global`` at the EOT token and uses the other tokens as
    ``t_local``. The generator interface receives ``prompt_embeds`` without token ids, so a learned
    global token is prepended instead and its output is ``t_global`` (a [CLS] token: the same role,
    found by attention rather than by position). SDXL's pooled embedding joins ``t_global``.
    """

    def __init__(self, context_dim: int, text_dim: int, heads: int, layers: int, pooled_dim: int = 0):
        super().__init__()
        if text_dim % heads:
            raise ValueError(f"text_dim {text_dim} must be divisible by text_heads {heads}")
        self.proj_in = nn.Linear(context_dim, text_dim)
        self.global_token = nn.Parameter(torch.randn(1, 1, text_dim) * 0.02)
        # Random-init residual branches, not zero: they mix the prompt into the global token from step 0
        # (zero-init ones left t_global constant at the start and the student ignored the prompt).
        self.blocks = nn.ModuleList(TransformerBlock(text_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(text_dim)
        self.pooled = nn.Linear(pooled_dim, text_dim) if pooled_dim > 0 else None
        self.global_dim = text_dim * (2 if pooled_dim > 0 else 1)

    def forward(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None):
        # prompt_embeds [N,L,D], pooled [N,P] -> t_global [N,G], t_local [N,L,T]
        tokens = self.proj_in(prompt_embeds)
        x = torch.cat([self.global_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        t_global = pixel_norm(x[:, 0])
        if self.pooled is not None:
            t_global = torch.cat([t_global, pixel_norm(self.pooled(pooled))], dim=1)
        return t_global, x[:, 1:]


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from feature pixels to text tokens, residual; output zero-initialised
    so the block starts as the identity and fades in (stable GAN start)."""

    def __init__(self, channels: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = attention_heads(channels, head_dim)
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # [N,C,H,W], [N,L,T] -> [N,C,H,W]
        n, c, h, w = x.shape
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q = split(self.q(self.norm(x).flatten(2).transpose(1, 2)))
        k, v = self.kv(context).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q, split(k), split(v)).transpose(1, 2).flatten(2)
        return x + self.out(y).transpose(1, 2).reshape(n, c, h, w)


def upsample(x: torch.Tensor) -> torch.Tensor:
    # Bilinear x2 is the separable [1,3,3,1] filter StyleGAN2 upsamples with.
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
