"""What the training scripts hand to accelerate's trackers (tensorboard, wandb): the run config and images."""

from __future__ import annotations

import numpy as np

from distill.core.config import config_dict


def tracker_config(config) -> dict:
    """A dataclass config as tracker hyperparameters: unset keys dropped, lists joined into text
    (tensorboard's hparams take numbers, strings and booleans only)."""
    out = {}
    for key, value in config_dict(config).items():  # Hub tokens already left out there
        if value is None:
            continue
        out[key] = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out


def log_images(trackers, images: dict, *, step: int) -> None:
    """Log ``{name: [PIL images]}`` to every tracker that takes images, each in the form it expects."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for name, batch in images.items():  # one tensorboard image per list entry would need equal sizes
                tracker.log_images(
                    {name: np.stack([np.asarray(im.convert("RGB")) for im in batch])}, step=step, dataformats="NHWC"
                )
        elif tracker.name == "wandb":
            tracker.log_images(images, step=step)
