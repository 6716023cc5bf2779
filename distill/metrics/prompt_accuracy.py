"""Prompt accuracy: the share of samples that a classifier reads as the class their prompt asked for.

Used by the digits testbed (does the image show the digit the prompt named?); any classifier with
``predict(images [N,3,H,W] in [-1, 1]) -> labels [N]`` works.
"""

from __future__ import annotations

import numpy as np
import torch


def prompt_accuracy(
    images: list[np.ndarray],  # N x [H,W,3] uint8, as cached by the evaluation
    labels: list[int],
    *,
    classifier,
    device: str | torch.device = "cpu",
) -> tuple[float, dict]:
    """(accuracy, details with per-class accuracy and the confusion counts)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [N,3,H,W] in [-1, 1]
    classifier = classifier.to(device).eval()
    pred = classifier.predict(x.to(device)).cpu()
    target = torch.tensor(labels)
    correct = pred == target
    per_class = {int(c): float(correct[target == c].float().mean()) for c in target.unique()}
    return float(correct.float().mean()), {"per_class": per_class, "num_images": len(labels)}
