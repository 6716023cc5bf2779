"""Train the evaluation-only digit classifier (pixels) on the digits train split.

    python distill/digits/train_classifier.py --config configs/digits/classifier.yaml \
        --output_dir runs/digits-classifier

Writes OUTPUT_DIR/model (``DigitClassifier.from_pretrained``-loadable), OUTPUT_DIR/config.yaml and
prints the held-out accuracy. Random shifts of +-2 px make it read generated digits that are not
perfectly centred the way sklearn's are.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # see train_teacher.py
    os.environ.setdefault(_var, "1")

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_gen.digits import load_digits_images
from distill.core.config import command, parse_config, require_positive, save_config
from teachers.digits_classifier import DigitClassifier


@dataclass
class ClassifierConfig:
    output_dir: str = field(default="runs/digits-classifier", metadata={"help": "run directory"})
    seed: int = 0
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    steps: int = field(default=300, metadata={"help": "training steps"})
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = field(default=2, metadata={"help": "random translation augmentation, pixels"})


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift], padding with background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model.predict(images) == labels).float().mean().item()


@command
def main() -> None:
    cfg = parse_config(ClassifierConfig, description=__doc__.split("\n\n")[0])
    require_positive(cfg, "lr")
    torch.set_num_threads(cfg.num_threads)
    torch.set_flush_denormal(True)
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    images, labels = load_digits_images(split="train")  # [N,3,32,32], [N]
    held_images, held_labels = load_digits_images(split="held_out")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    model.train()
    bar = tqdm(range(cfg.steps), desc="classifier", mininterval=5)
    for _ in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        loss = F.cross_entropy(model(_shift(images[idx], cfg.max_shift, generator)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    acc = accuracy(model, held_images, held_labels)
    model.save_pretrained(out / "model")
    (out / "metrics.json").write_text(
        json.dumps({"held_out_accuracy": acc, "held_out_size": len(held_labels)}, indent=2)
    )
    print(f"held-out accuracy {acc:.4f} on {len(held_labels)} digits; model written to {out / 'model'}")


if __name__ == "__main__":
    main()
