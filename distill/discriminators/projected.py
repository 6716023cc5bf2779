"""StyleGAN-T's projected discriminator (Sauer et al., ICML 2023, §3.2 and Fig. 3c).

A frozen pretrained feature network (:mod:`.features`; the paper: DINO ViT-S/16) reads the image after
DiffAugment (colour, translation, cutout; always on) and, early in training, a fading blur; one head per
hooked feature level turns its token sequence into per-token logits. Heads are minimal: a 1x1 and a
residual kernel-9 1-D convolution over the tokens (spectral-normalised), each followed by batch norm over
small *virtual* batches of the local minibatch (no running statistics, no synchronisation across
processes) and a leaky ReLU; the text enters by projection at the end (the inner product of the head's
``cmap_dim`` channels with a projection of the text vector). Used with the hinge loss, evaluated per token.

In a VAE's latent space the discriminator first decodes the latents with the frozen decoder (the feature
network reads pixels); real latents take the same path, so D cannot tell them apart by decoder artefacts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distill.losses.diffaugment import DEFAULT_POLICY, DiffAugment
from students.latents import decode_vae

from .features import FeatureNetwork
from .inputs import TextPooling, blur, pooled_embeds
from .minibatch_std import minibatch_std


class VirtualBatchNorm(nn.Module):
    """Batch norm over virtual batches of at most ``virtual_batch`` consecutive samples of the local minibatch
    (StyleGAN-T's BatchNormLocal; Hoffer et al. 2017): statistics over samples and tokens, no running averages.
    ``virtual_batch`` 0: no normalisation (the affine only).

    ``parts``: the batch is that many equal parts (real | generated, concatenated for one forward). Separately
    (``mixed`` False, StyleGAN-T): no virtual batch straddles two parts, so each part is normalised by its own
    statistics, as when they are run separately; a difference of mean or scale between real and generated
    features (a blur is one) is then removed before D's heads can read it. ``mixed``: every virtual batch takes
    the same number of samples from each part (sample i of each part together), so one set of statistics
    normalises real and generated features alike and such differences survive; the generator's phase then
    passes real samples beside its own (:attr:`ProjectedDiscriminator.needs_reference`)."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5, mixed: bool = False):
        super().__init__()
        self.virtual_batch, self.eps, self.mixed = virtual_batch, eps, mixed
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:  # [N,C,L]
        if self.virtual_batch <= 0:  # normalisation off (an ablation of StyleGAN-T's design)
            return x * self.weight[None, :, None] + self.bias[None, :, None]
        n, c, length = x.shape
        if n % parts:
            raise ValueError(f"batch {n} does not split into {parts} equal parts")
        per_part = n // parts
        interleave = self.mixed and parts > 1
        if interleave:  # [part, i] -> [i, part]: a virtual batch then holds sample i of every part
            x = x.view(parts, per_part, c, length).transpose(0, 1).reshape(n, c, length)
        rows = (
            max(1, self.virtual_batch // parts) if interleave else self.virtual_batch
        )  # samples of one part per virtual batch
        groups = math.ceil(per_part / rows)
        while per_part % groups:  # equal virtual batches of at most virtual_batch samples
            groups += 1
        g = x.float().view(groups if interleave else parts * groups, -1, c, length)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = ((g - mean) * torch.rsqrt(var + self.eps)).view(n, c, length)
        if interleave:  # back to [part, i]
            g = g.view(per_part, parts, c, length).transpose(0, 1).reshape(n, c, length)
        return (g * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


class _Block(nn.Module):
    """Spectral-norm 1-D conv -> virtual batch norm -> leaky ReLU; circular padding where the sequence allows."""

    def __init__(self, channels: int, kernel_size: int, tokens: int, virtual_batch: int, mixed: bool):
        super().__init__()
        k = max(1, min(kernel_size, tokens if tokens % 2 else tokens - 1))  # odd, no longer than the sequence
        self.conv = spectral_norm(nn.Conv1d(channels, channels, k, padding=k // 2, padding_mode="circular"))
        self.norm = VirtualBatchNorm(channels, virtual_batch, mixed=mixed)

    def forward(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x), parts), 0.2)


class ProjectedHead(nn.Module):
    """One feature level's head: ``forward(tokens [N,C,L], text [N,T], parts, mismatched [K,T] | None) -> logits
    [N(+K),1,L]``
    (the first K samples again, under the ``mismatched`` text: only the projection depends on the text)."""

    def __init__(
        self,
        channels: int,
        tokens: int,
        text_dim: int,
        *,
        cmap_dim: int,
        kernel_size: int,
        virtual_batch: int,
        mixed: bool = False,
        mbstd_group: int = 0,
    ):
        super().__init__()
        self.mbstd_group = mbstd_group
        self.block = _Block(channels, 1, tokens, virtual_batch, mixed)
        self.residual = _Block(channels, kernel_size, tokens, virtual_batch, mixed)
        self.cls = spectral_norm(nn.Conv1d(channels + (1 if mbstd_group > 1 else 0), cmap_dim, 1))
        self.cmapper = nn.Linear(text_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, parts: int, mismatched: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.block(x, parts)
        h = (h + self.residual(h, parts)) / math.sqrt(2)
        if self.mbstd_group > 1:
            # The spread of the frozen features themselves, measured before the virtual batch norm (which rescales each
            # part to unit variance and so would hide a collapsed generator's small spread), joins the last layer.
            spread = minibatch_std(x[..., None], group_size=self.mbstd_group, parts=parts)[:, -1:, :, 0]  # [N,1,L]
            h = torch.cat([h, spread.to(h.dtype)], dim=1)
        h = self.cls(h)
        if mismatched is not None:
            h, text = torch.cat([h, h[: mismatched.shape[0]]]), torch.cat([text, mismatched])
        # Projection conditioning: <features, projected text> per token, scaled to unit variance.
        return (h * self.cmapper(text)[:, :, None]).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    """``forward(x, prompt_embeds, added_cond_kwargs=None, *, pyramid=None, parts=1, blur_sigma=0, mismatched=None)
    -> [N(+K),1,L_i] logits per feature level``.

    x: images in [-1, 1] [N,3,H,W], or VAE-scaled latents when ``decode`` (latents -> images, frozen and
    differentiable) is given. ``mismatched``: other text for the first K samples (``{"prompt_embeds",
    "added_cond_kwargs"}``), whose logits follow the N others (the matching-aware term at the cost of a
    projection). ``pyramid`` is accepted for the common discriminator interface and ignored.

    ``mixed_norm``: real and generated samples share the heads' batch statistics (:class:`VirtualBatchNorm`);
    ``needs_reference`` is then True and a forward over generated samples alone (the generator's phase) must be
    given real ones as a second part to normalise with, their logits dropped by the caller. ``mbstd_group > 1``: each
    head also reads the minibatch standard deviation of its frozen features (``minibatch_std.py``).
    """

    uses_pyramid = False

    def __init__(
        self,
        features: FeatureNetwork,
        *,
        context_dim: int,
        pooled_dim: int = 0,
        cmap_dim: int = 64,
        text_dim: int = 256,
        kernel_size: int = 9,
        virtual_batch: int = 8,
        augment: str = DEFAULT_POLICY,
        decode: nn.Module | None = None,
        mixed_norm: bool = False,
        mbstd_group: int = 0,
    ):
        super().__init__()
        self.needs_reference = bool(mixed_norm and virtual_batch > 0)
        self.features = features
        self.decode = decode.requires_grad_(False) if decode is not None else None
        self.augment = DiffAugment(augment)
        self.text = TextPooling(context_dim, text_dim, pooled_dim=pooled_dim)
        self.heads = nn.ModuleList(
            ProjectedHead(
                c,
                length,
                text_dim,
                cmap_dim=cmap_dim,
                kernel_size=kernel_size,
                virtual_batch=virtual_batch,
                mixed=mixed_norm,
                mbstd_group=mbstd_group,
            )
            for c, length in features.shapes()
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.decode is not None:
            self.decode.eval()
        return self

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
        images = self.decode(x) if self.decode is not None else x
        images = self.augment(blur(images, blur_sigma))
        text = self.text(prompt_embeds, pooled_embeds(added_cond_kwargs))
        other = (
            self.text(mismatched["prompt_embeds"], pooled_embeds(mismatched.get("added_cond_kwargs")))
            if mismatched
            else None
        )
        return [head(tokens, text, parts, other) for head, tokens in zip(self.heads, self.features(images))]


class LatentDecoder(nn.Module):
    """Frozen VAE decoder as a differentiable module: VAE-scaled latents -> images in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_vae(self.vae, latents).to(latents.dtype)
