"""A small pixel-space digit classifier, used only to evaluate the digits testbed.

It reads generated images (prompt accuracy: is it the digit the prompt asked for) and its
penultimate layer is the feature space for the testbed's classifier-FID (Inception features mean
little on 32 px digits). Saved/loaded like a diffusers model (config.json + safetensors).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class DigitClassifier(ModelMixin, ConfigMixin):
    """3 conv layers (32 -> 16 -> 8 -> 4 px) + a feature layer + a linear head.

    Input: images [N, 3, 32, 32] in [-1, 1]. ``forward`` gives logits [N, num_classes],
    ``features`` the penultimate activations [N, feature_dim].
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = 10,
        image_size: int = 32,
    ):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        spatial = image_size // 2 ** len(channels)
        self.fc = nn.Linear(c_in * spatial * spatial, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, feature_dim] (after ReLU) of images [N, 3, H, W] in [-1, 1]."""
        return torch.relu(self.fc(self.convs(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels [N] (int64); runs in batches, no grad."""
        return torch.cat([self(images[i : i + batch_size]).argmax(dim=1) for i in range(0, len(images), batch_size)])
