"""Pieces for training a latent LPIPS net: VAE encoding, the labelled image dataset and its loader, the stage-1
classifier head, LPIPS's 2AFC ranking head and score, the LR schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from distill.losses.elatentlpips import LatentLPIPSNet


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, sampling: str) -> torch.Tensor:
    """Pixels in [-1, 1] -> diffusers-scaled latents, the convention the metric is used with."""
    from students.latents import scale_latents

    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    z = dist.sample() if sampling == "sample" else dist.mode()
    return scale_latents(z, vae.config).float()


def load_image_dataset(dataset: str, *, split: str, image_column: str, label_column: str, max_samples: int):
    """(dataset, num_classes) from a save_to_disk dir, parquet file/dir, image folder or datasets Hub name
    (``max_samples`` 0: all); opened as every image dataset here is (``data_gen.image_text.open_dataset``)."""
    from data_gen.image_text import open_dataset

    if not dataset:
        raise ValueError("set `dataset` (a save_to_disk dir, parquet file/dir, or a datasets Hub name)")
    ds = open_dataset(dataset, split=split)
    for col in (image_column, label_column):
        if col not in ds.column_names:
            raise ValueError(f"column {col!r} not in dataset {dataset}; columns: {ds.column_names}")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    feature = ds.features[label_column]
    num_classes = getattr(feature, "num_classes", None) or int(max(ds[label_column])) + 1
    return ds, num_classes


def classifier_loader(
    ds,
    *,
    image_column: str,
    label_column: str,
    resolution: int,
    crop_scale_min: float,
    batch_size: int,
    num_workers: int,
) -> torch.utils.data.DataLoader:
    """Shuffled batches of ``{"pixels": [-1, 1] random-resized crops, flipped, "label": int}`` from an image dataset."""
    from torchvision import transforms as T

    pixel_tf = T.Compose(
        [
            T.RandomResizedCrop(resolution, scale=(crop_scale_min, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),  # VAE input range [-1, 1]
        ]
    )

    def transform(batch):
        return {
            "pixels": [pixel_tf(im.convert("RGB")) for im in batch[image_column]],
            "label": [int(v) for v in batch[label_column]],
        }

    return torch.utils.data.DataLoader(
        ds.with_transform(transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(ds) >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class TrunkClassifier(nn.Module):
    """Stage-1 model: latent trunk -> global average pool -> linear (the head is discarded afterwards)."""

    def __init__(self, net: LatentLPIPSNet, num_classes: int):
        super().__init__()
        self.net = net
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(net.config.stage_channels[-1], num_classes))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net.features(latents)[-1].mean(dim=(2, 3)))


class Dist2Logit(nn.Module):
    """LPIPS's 2AFC ranking head: (d0, d1) -> P(human prefers p1)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(5, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
        x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], dim=1)
        return self.model(x).squeeze(1)  # logits; BCE-with-logits is the stable form of LPIPS's sigmoid+BCE


def score_2afc(net, vae, loader, sampling: str, device) -> float:
    """LPIPS's 2AFC score: agreement with the human fraction (1.0 = always agrees with everyone)."""
    scores = []
    net.eval()
    with torch.no_grad():
        for ref, p0, p1, judge in loader:
            ref, p0, p1 = (encode(vae, t.to(device), sampling) for t in (ref, p0, p1))
            d0, d1 = net(ref, p0), net(ref, p1)
            j = judge.to(device)
            scores.append((d0 < d1).float() * (1 - j) + (d1 < d0).float() * j + (d0 == d1).float() * 0.5)
    return torch.cat(scores).mean().item()


def cycle(loader):
    while True:
        yield from loader


def lr_lambda(warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f
