"""The student's EMA (distill/training/ema.py): the ramp-up that caps its half-life early, the copy made on its own
device and dtype."""

from __future__ import annotations

import pytest
import torch


def test_ema_rampup_limits_the_half_life_early():
    from distill.training.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ramped, plain = EMA(model, half_life_kimg=10, rampup=0.5), EMA(model, half_life_kimg=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ramped.update(model, 100, nimg=100)  # half-life min(10k, 0.5 * 100) = 50 images: beta = 0.5 ** 2
    plain.update(model, 100, nimg=100)  # half-life 10k images: the average barely moves
    assert ramped.model.weight.item() == pytest.approx(0.75)
    assert plain.model.weight.item() == pytest.approx(1 - 0.5**0.01)


def test_ema_copy_is_made_on_its_own_device_and_dtype():
    """Each tensor goes straight to the EMA's device / dtype (the meta device stands in for the CPU beside an
    accelerator: no data); integer buffers keep their dtype; the update lerps there."""
    from distill.training.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, half_life_kimg=1, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype, p.requires_grad) for p in ema.model.parameters()} == {
        ("meta", torch.bfloat16, False)
    }
    assert ema.model[1].num_batches_tracked.dtype == torch.long and model[0].weight.device.type == "cpu"
    ema.update(model, 1, nimg=1)
    with ema.on("meta") as same:
        assert same is ema.model
