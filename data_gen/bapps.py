"""BAPPS 2AFC patches (``ref/ p0/ p1/ judge/``) as a torch dataset of images in [-1, 1] and human judgements."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class BAPPS2AFC(torch.utils.data.Dataset):
    """BAPPS 2AFC layout: ``ref/X.png, p0/X.png, p1/X.png, judge/X.npy`` (judge = fraction preferring p1)."""

    def __init__(self, roots: str, resolution: int):
        self.items = []
        for root in [Path(r) for r in roots.split(",") if r]:
            for sub in ("ref", "p0", "p1", "judge"):
                if not (root / sub).is_dir():
                    raise FileNotFoundError(f"{root} is not a BAPPS 2AFC dir: missing {sub}/")
            for ref in sorted((root / "ref").iterdir()):
                stem = ref.stem
                p0, p1, judge = (next((root / s).glob(stem + ".*"), None) for s in ("p0", "p1", "judge"))
                if p0 and p1 and judge:
                    self.items.append((ref, p0, p1, judge))
        if not self.items:
            raise ValueError(f"no complete (ref, p0, p1, judge) quadruples under {roots}")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def _img(self, path: Path) -> torch.Tensor:
        img = Image.open(path).convert("RGB").resize((self.resolution, self.resolution), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def __getitem__(self, i: int):
        ref, p0, p1, judge = self.items[i]
        j = float(np.asarray(np.load(judge), dtype=np.float32).reshape(-1)[0])
        return self._img(ref), self._img(p0), self._img(p1), torch.tensor(j)
