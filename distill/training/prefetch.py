"""Micro-batches read ahead by DataLoader workers, in the training loop's order.

A trainer's data is a map-style ``source``: global micro-batch number -> that process's batch (a pure
function of the number, e.g. through :func:`distill.training.seeds.batch_indices`). :class:`Prefetch`
serves ``source[micro]`` for consecutive numbers from the one a run starts (or resumes) at; workers read
the next ones meanwhile, so batch ``micro`` is the same whatever ``num_workers``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch


class _Numbered(torch.utils.data.Dataset):
    """``source[i]`` with its number, so the reader can check it got the batch it asked for."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, micro: int):
        return micro, self.source[micro]

    def __len__(self):  # unbounded: the sampler decides which micro-batches are read
        return 2**62


class Prefetch:
    """``data = Prefetch(source, num_workers=n)``; ``data.start(micro)``; then ``data.read(micro)``,
    ``data.read(micro + 1)``, ... (0 workers: read in this process when asked)."""

    def __init__(self, source, *, num_workers: int, pin_memory: bool = False):
        self.source, self.num_workers, self.pin_memory = source, num_workers, pin_memory
        self._loader = None

    def start(self, micro: int) -> None:
        """Read from micro-batch ``micro`` on (a resumed run's first); workers prefetch in order."""
        if self.num_workers > 0:
            self._loader = iter(
                torch.utils.data.DataLoader(
                    _Numbered(self.source),
                    batch_size=None,
                    sampler=itertools.count(micro),
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                )
            )

    def read(self, micro: int) -> Any:
        if self._loader is None:
            return self.source[micro]
        got, batch = next(self._loader)
        if got != micro:  # a trainer that skips or repeats a number would silently change the data order
            raise RuntimeError(
                f"prefetched micro-batch {got} but micro-batch {micro} was asked for: read consecutively after start()"
            )
        return batch
