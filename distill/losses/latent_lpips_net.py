"""The E-LatentLPIPS network (Diffusion2GAN Sec. 3.2): a VGG16-BN-style trunk on VAE latents and LPIPS heads.

The loss around it (augmentation ensemble, the latent convention) is :mod:`.elatentlpips`; the published
checkpoints and their conversion to this network are :mod:`.elatentlpips_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _unit_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    # eps inside the sqrt, as in the published implementation, so distances match it bit-for-bit.
    return x / torch.sqrt(torch.sum(x * x, dim=1, keepdim=True) + eps)


class LatentLPIPSNet(ModelMixin, ConfigMixin):
    """Latent VGG16-BN-style trunk plus non-negative 1x1 heads; ``forward(x, y) -> [N]`` (no augmentation).

    Stage ``s`` is ``convs_per_stage[s]`` x (conv3x3, BN, ReLU), then a 2x2 max-pool if
    ``pool_after_stage[s]``; its output is the feature compared at that stage. The defaults are VGG16-BN
    with the first three pools removed (paper App.), which is also the published checkpoints' layout.
    ``scaling_factor``/``shift_factor`` record the VAE convention the weights were trained on.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        stage_channels: tuple[int, ...] = (64, 128, 256, 512, 512),
        convs_per_stage: tuple[int, ...] = (2, 2, 3, 3, 3),
        pool_after_stage: tuple[bool, ...] = (False, False, False, True, True),
        scaling_factor: float = 0.18215,
        shift_factor: float = 0.0,
        head_dropout: float = 0.0,
    ):
        super().__init__()
        if not (len(stage_channels) == len(convs_per_stage) == len(pool_after_stage)):
            raise ValueError("stage_channels, convs_per_stage and pool_after_stage must have one entry per stage")
        stages = []
        c_in = latent_channels
        for c_out, n_conv, pool in zip(stage_channels, convs_per_stage, pool_after_stage):
            layers: list[nn.Module] = []
            for _ in range(n_conv):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in stage_channels)
        # Uncalibrated default: every channel weighs 1, i.e. LPIPS's "baseline" (plain feature distance).
        for head in self.heads:
            nn.init.ones_(head.weight)
        self.dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage trunk outputs (what the classifier and the distance both use)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def clamp_heads_(self) -> None:
        """Project head weights onto >= 0 (call after each optimizer step when calibrating)."""
        with torch.no_grad():
            for head in self.heads:
                head.weight.clamp_(min=0)

    def forward(self, x: torch.Tensor, y: torch.Tensor, per_stage: bool = False):
        n = x.shape[0]
        # One trunk pass over both inputs: halves the number of kernel launches for small latents.
        feats = self.features(torch.cat([x, y], dim=0))
        per = []
        for f, head in zip(feats, self.heads):
            fx, fy = f[:n], f[n:]
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
            # Heads are non-negative by construction so that d >= 0 whatever the weights hold.
            w = head.weight.clamp(min=0)
            per.append(F.conv2d(self.dropout(diff), w).mean(dim=(1, 2, 3)))
        dist = torch.stack(per, dim=0).sum(dim=0)
        return (dist, per) if per_stage else dist
