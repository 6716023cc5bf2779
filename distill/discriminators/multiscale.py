"""GigaGAN's multi-scale text-conditioned discriminator (Kang et al., CVPR 2023, §3.3: "multi-scale input,
multi-scale output").

It reads an image pyramid, coarse to fine: the generator's own (its running outputs at every synthesis
level) for generated samples, the real sample area-downsampled to the same sizes for real ones. Scale k
enters a shared convolutional trunk at the depth of its resolution (a 1x1 conv), and from there every
further trunk block makes a prediction: patch logits, text-conditioned by projection with a pooled
text vector (an unconditional term plus the inner product of ``cmap_dim`` feature channels with the
projected text). Each scale is DiffAugmented on its own. Used with the matching-aware term (a real
image with another caption counts as fake) and R1, as in GigaGAN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.diffaugment import DEFAULT_POLICY, DiffAugment

from .inputs import TextPooling, blur, pooled_embeds
from .minibatch_std import minibatch_std


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # The sqrt(2) gain keeps unit second moment through the activation (StyleGAN2's D): with unit-variance weights the
    # logits start at O(1) scale, not shrunk layer by layer as with PyTorch's default init.
    return F.leaky_relu(x, 0.2) * math.sqrt(2.0)


def _he_init(module: nn.Module) -> None:
    """Weights N(0, 1 / fan-in), biases 0, for every conv and linear layer below ``module``: with :func:`_lrelu`'s gain
    every layer keeps its input's scale, and per-layer Adam rates of lr / sqrt(fan-in) (``d_lr_by_fan_in``) then move
    each layer at the same relative rate, as StyleGAN2's equalised learning rate does."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DownBlock(nn.Module):
    """Residual block: two 3x3 convs and a 2x average-pool, plus a pooled 1x1 skip (ResNet-style GAN D)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,I,h,w] -> [N,O,h/2,w/2]
        h = F.avg_pool2d(_lrelu(self.conv2(_lrelu(self.conv1(x)))), 2)
        return (h + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


class ProjectionHead(nn.Module):
    """``forward(features [N,C,h,w], text [N,T]) -> patch logits [N,1,h,w]``: unconditional + projection term."""

    def __init__(self, channels: int, text_dim: int, cmap_dim: int, mbstd_group: int = 0):
        super().__init__()
        self.mbstd_group = mbstd_group
        extra = 1 if mbstd_group > 1 else 0  # the minibatch-std channel
        self.out = nn.Conv2d(channels + extra, 1, 1)
        self.proj = nn.Conv2d(channels + extra, cmap_dim, 1)
        self.cmapper = nn.Linear(text_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(
        self, h: torch.Tensor, text: torch.Tensor, mismatched: torch.Tensor | None = None, parts: int = 1
    ) -> torch.Tensor:
        h = _lrelu(h)
        if self.mbstd_group > 1:
            h = minibatch_std(h, group_size=self.mbstd_group, parts=parts)
        out, proj = self.out(h), self.proj(h)
        if mismatched is not None:  # the first K samples again under other text: only the projection changes
            k = mismatched.shape[0]
            out, proj, text = torch.cat([out, out[:k]]), torch.cat([proj, proj[:k]]), torch.cat([text, mismatched])
        return out + (proj * self.cmapper(text)[:, :, None, None]).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


class MultiScaleDiscriminator(nn.Module):
    """``forward(x [N,C,R,R], prompt_embeds, added_cond_kwargs=None, *, pyramid=None, parts=1, blur_sigma=0,
    mismatched=None) -> patch logits [N(+K),1,h,w]`` for every (input scale, trunk depth >= it): ``num_scales *
    (num_scales + 1) / 2`` maps.

    x: the sample at full resolution ``resolution`` (latents or images, ``in_channels`` channels). pyramid: the
    generator's outputs coarse -> fine (the last ``num_scales`` are used; the finest is ``x``); None builds it by
    area-downsampling ``x`` (real samples, R1). ``mismatched``: other text for the first K samples
    (``{"prompt_embeds", "added_cond_kwargs"}``), whose logits follow the N others. ``parts``: how many equal parts
    (real | generated) the batch holds; with ``mbstd_group > 1`` every head also reads the minibatch standard
    deviation of its features over groups of that many samples of one part (``minibatch_std.py``).
    ``generator_pyramid`` False: every sample's pyramid is its area-downsampled output (the callers then pass none).
    """

    needs_reference = False  # see ProjectedDiscriminator

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        context_dim: int,
        pooled_dim: int = 0,
        channels: tuple[int, ...] = (64, 128, 256),
        text_dim: int = 128,
        cmap_dim: int = 64,
        augment: str = DEFAULT_POLICY,
        mbstd_group: int = 0,
        generator_pyramid: bool = True,
    ):
        super().__init__()
        # False: generated samples are area-downsampled like real ones instead of read from the generator's own
        # pyramid, whose coarse levels it can then not shape apart from its output (measured on the digits,
        # docs/from-scratch.md).
        self.uses_pyramid = generator_pyramid
        num_scales = len(channels)
        self.sizes = [resolution // 2**k for k in range(num_scales)]  # fine -> coarse
        if resolution % 2**num_scales or self.sizes[-1] < 2:
            raise ValueError(
                f"resolution {resolution} must be divisible by 2**{num_scales} (one halving per trunk block of "
                f"d_channels {tuple(channels)}): use fewer d_channels or a larger resolution"
            )
        outs = [channels[min(k + 1, num_scales - 1)] for k in range(num_scales)]
        self.from_input = nn.ModuleList(nn.Conv2d(in_channels, c, 1) for c in channels)
        self.blocks = nn.ModuleList(DownBlock(c, o) for c, o in zip(channels, outs))
        self.heads = nn.ModuleList(ProjectionHead(o, text_dim, cmap_dim, mbstd_group=mbstd_group) for o in outs)
        self.text = TextPooling(context_dim, text_dim, pooled_dim=pooled_dim)
        self.augment = DiffAugment(augment)
        for part in (self.from_input, self.blocks, self.heads):
            _he_init(part)

    def levels(self, x: torch.Tensor, pyramid: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The inputs fine -> coarse: ``x`` and the pyramid's coarser levels (or ``x`` area-downsampled)."""
        if pyramid is None:
            return [x] + [F.interpolate(x, size=(s, s), mode="area") for s in self.sizes[1:]]
        coarser = list(reversed(pyramid[:-1]))[: len(self.sizes) - 1]
        got = [x.shape[-1]] + [p.shape[-1] for p in coarser]
        if got != self.sizes:
            raise ValueError(
                f"pyramid sides {got} (fine -> coarse) do not match this discriminator's {self.sizes}: "
                "use as many d_channels as the generator has levels, or fewer"
            )
        return [x, *coarser]

    def forward(
        self,
        x: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond_kwargs: dict | None = None,
        *,
        pyramid: list[torch.Tensor] | None = None,
        parts: int = 1,
        blur_sigma: float = 0.0,
        mismatched: dict | None = None,
    ) -> list[torch.Tensor]:
        text = self.text(prompt_embeds, pooled_embeds(added_cond_kwargs))
        other = (
            self.text(mismatched["prompt_embeds"], pooled_embeds(mismatched.get("added_cond_kwargs")))
            if mismatched
            else None
        )
        logits = []
        for k, level in enumerate(self.levels(x, pyramid)):
            level = self.augment(blur(level, blur_sigma * self.sizes[k] / self.sizes[0]))
            h = self.from_input[k](level)
            for j in range(k, len(self.blocks)):
                h = self.blocks[j](h)
                logits.append(self.heads[j](h, text, other, parts=parts))
        return logits
