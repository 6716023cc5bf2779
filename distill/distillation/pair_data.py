"""Stage two's training rows: micro-batch number -> this process's rows of the pairs' training part, and the
text conditioning stored with them.

The rows are :func:`distill.training.seeds.batch_indices` of the first ``num_train`` pairs (a pure function
of seed, micro-batch and rank), so :class:`distill.training.prefetch.Prefetch` can read them ahead in
DataLoader workers and a resumed run continues the same order.
"""

from __future__ import annotations

import torch

from distill.training.seeds import batch_indices
from students.text import TextConditioning, sdxl_time_ids


class PairRows(torch.utils.data.Dataset):
    """``rows[micro]``: the pairs' columns (torch format) at that micro-batch's indices, on the CPU."""

    def __init__(self, pairs, *, num_train: int, seed: int, rank: int, world: int, batch_size: int):
        self.pairs, self.num_train = pairs, num_train
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch_size

    def __getitem__(self, micro: int) -> dict:
        return self.pairs[
            batch_indices(
                seed=self.seed,
                step=micro,
                rank=self.rank,
                world=self.world,
                batch_size=self.batch_size,
                num_rows=self.num_train,
            )
        ]


def stored_conditioning(
    rows: dict, *, resolution: int, device, dtype: torch.dtype, family: str = "sd"
) -> TextConditioning:
    """The text conditioning ``generate_pairs.py --store_prompt_embeds`` stored with ``rows`` (the teacher's
    ``encode_text`` / ``encode_sd3_text`` output; SDXL's time ids follow from the ``resolution``, SD3 has none),
    as ``dtype`` on ``device``; ``family``: the teacher's (sd, sdxl, sd3)."""
    embeds = rows["prompt_embeds"].to(device, dtype, non_blocking=True)
    if "pooled_prompt_embeds" not in rows:
        return TextConditioning(embeds)
    pooled = rows["pooled_prompt_embeds"].to(device, dtype, non_blocking=True)
    if family == "sd3":
        return TextConditioning(embeds, pooled)
    return TextConditioning(
        embeds, pooled, sdxl_time_ids((resolution, resolution), batch=len(embeds), dtype=dtype, device=device)
    )
