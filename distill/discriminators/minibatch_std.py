"""Minibatch standard deviation (Karras et al., "Progressive Growing of GANs", ICLR 2018, §3; StyleGAN2's D epilogue).

The discriminator appends, to the features it judges, the standard deviation of those features across a small group
of samples (averaged over channels and positions: one number per group, broadcast as one extra channel). A generator
that draws the same image whatever its noise gives a group with near-zero spread, which real images never have, so
D can see mode collapse directly instead of only sample by sample. Groups never straddle ``parts``: real and
generated samples that share one forward are measured apart (a mixed group would leak the other part's spread).
"""

from __future__ import annotations

import torch


def minibatch_std(x: torch.Tensor, *, group_size: int, parts: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``x`` [N,C,H,W] -> [N,C+1,H,W]: the extra channel is the mean over (C,H,W) of the per-position std within each
    group of ``group_size`` consecutive samples of the same part (a smaller group where the part is not divisible)."""
    n, c, h, w = x.shape
    if parts < 1 or n % parts:
        raise ValueError(f"batch {n} does not split into {parts} equal parts")
    per_part = n // parts
    g = min(group_size, per_part)
    while per_part % g:  # the largest group size <= group_size that divides the part
        g -= 1
    y = x.float().reshape(parts * (per_part // g), g, c, h, w)  # [P*G', g, C, H, W]
    # The variance by hand: torch's CPU var() over a middle dimension is ~20x slower (0.50 s against 0.025 s for
    # [16,4,129,32,32] on 2 cores; it was 30 % of a multiscale D's step).
    var = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)  # [P*G',C,H,W]
    std = (var + eps).sqrt().mean(dim=(1, 2, 3))  # [P*G']
    stat = std.repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)  # [N,1,H,W]
    return torch.cat([x, stat], dim=1)
