"""The shared training loop (distill/training/loop.py): host syncs per step, logged means, the NaN/inf stop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_accelerator_state

from distill.training.ema import EMA
from distill.training.loop import TrainLoop

PROJECT = str(Path(__file__).resolve().parents[1] / "distill")
READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what makes the host wait for the device


def _loop(tmp_path, *, max_grad_norm: float, accumulation: int = 2):
    from accelerate import Accelerator

    fresh_accelerator_state()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    g, d = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.Adam(d.parameters(), lr=1e-2)
    g, d, opt_g, opt_d = acc.prepare(g, d, opt_g, opt_d)
    # max_train_steps beyond the steps run: no checkpoint or validation in between.
    loop = TrainLoop(
        acc,
        output_dir=tmp_path,
        seed=0,
        max_train_steps=100,
        gradient_accumulation_steps=accumulation,
        batch_size=2,
        checkpointing_steps=100,
        validation_steps=100,
        checkpoints_total_limit=None,
        ema=EMA(g, half_life_kimg=0),
        model=g,
        export=lambda path: None,
        validate=lambda step: None,
        checkpoint_bytes=lambda: 0,
    )
    seen: list[dict] = []

    def step(*, bad: str = "", max_grad_norm: float = max_grad_norm) -> dict:
        """One step: phase G (terms a, b), phase D (c, and the statistic s); ``bad``: the term made NaN."""
        logs: dict = {}
        record: dict = {}

        def micro(model, names):
            def run(m, generator):
                x = torch.randn(2, 3, generator=generator)
                y = model(x)
                terms = {names[0]: y.pow(2).mean(), names[1]: y.mean().abs()}
                if bad in terms:
                    terms[bad] = terms[bad] * float("nan")
                if "s" in names:  # a statistic: logged, not backpropagated
                    terms["s"] = y.detach().mean() * (float("nan") if bad == "s" else 1.0)
                if bad == "grad":  # finite loss, infinite gradient (d sqrt / dx at 0)
                    terms[names[0]] = terms[names[0]] + (y * 0).sum().abs().sqrt()
                for k, v in terms.items():
                    record.setdefault(k, []).append(v.item())
                return None, terms, sum(v for k, v in terms.items() if k != "s")

            return run

        loop.phase(
            purpose="g",
            model=g,
            optimizer=opt_g,
            params=g.parameters(),
            micro_step=micro(g, ("a", "b")),
            logs=logs,
            max_grad_norm=max_grad_norm,
        )
        loop.phase(
            purpose="d",
            model=d,
            optimizer=opt_d,
            params=list(d.parameters()),
            micro_step=micro(d, ("c", "s")),
            logs=logs,
            max_grad_norm=max_grad_norm,
        )
        seen.append({k: sum(v) / len(v) for k, v in record.items()})
        return loop.end_step(logs)

    return acc, loop, (g, d), step, seen


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_one_collective_and_few_host_reads_per_step(tmp_path, monkeypatch, max_grad_norm):
    """Per step (2 phases x 2 micro-batches x 4 terms): one reduce of all terms, one read of them, one read of
    each phase's gradient norm; stats.jsonl keeps the micro-batch means of every term."""
    acc, loop, _, step, seen = _loop(tmp_path, max_grad_norm=max_grad_norm)
    step()  # warm-up outside the count
    reads, reduces = [], []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT):
                reads.append((_name, caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reduce = acc.reduce
    monkeypatch.setattr(acc, "reduce", lambda *a, **k: reduces.append(1) or reduce(*a, **k))
    for _ in range(3):
        step()
    assert len(reduces) == 3, reduces
    assert len(reads) <= 3 * 3, reads
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [1, 2, 3, 4] and stats[-1]["nimg"] == 4 * 2 * 2
    for logged, expected in zip(stats, seen):
        assert logged.keys() - {"step", "nimg", "step_time"} == expected.keys() == {"a", "b", "c", "s"}
        assert logged["step_time"] > 0  # the step's wall-clock seconds
        for k, v in expected.items():
            assert logged[k] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
@pytest.mark.parametrize(
    "bad, message",
    [
        ("c", "non-finite loss at step 1 in term c: stopped; last good checkpoint: none yet"),
        ("a", "non-finite loss at step 1 in term a: stopped"),
        ("grad", "non-finite gradient norm at step 1 (every loss term finite): stopped"),
    ],
)
def test_a_non_finite_gradient_stops_before_the_optimiser_step(tmp_path, max_grad_norm, bad, message):
    _, loop, models, step, _ = _loop(tmp_path, max_grad_norm=max_grad_norm)
    step()
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    with pytest.raises(ValueError) as err:
        step(bad=bad)
    assert str(err.value).startswith(message), err.value
    failed = 0 if bad in ("a", "grad") else 1  # the phase that failed; G's step before a D failure stands
    for p, q in zip(models[failed].parameters(), before[failed]):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    if failed == 1:
        assert any(not torch.equal(p.detach(), q) for p, q in zip(models[0].parameters(), before[0]))
    assert loop.state.step == 1 and len((tmp_path / "stats.jsonl").read_text().splitlines()) == 1


def test_a_non_finite_statistic_stops_at_the_end_of_the_step(tmp_path):
    """A logged term that no gradient carries is caught where the terms are read, before the step is counted."""
    _, loop, _, step, _ = _loop(tmp_path, max_grad_norm=1.0)
    step()
    with pytest.raises(ValueError, match="non-finite loss at step 1 in term s: stopped"):
        step(bad="s")
    assert loop.state.step == 1 and len((tmp_path / "stats.jsonl").read_text().splitlines()) == 1


def _checkpointing_loop(tmp_path, export):
    from accelerate import Accelerator

    fresh_accelerator_state()
    acc = Accelerator(cpu=True)
    g = acc.prepare(torch.nn.Linear(3, 1))
    loop = TrainLoop(
        acc,
        output_dir=tmp_path,
        seed=0,
        max_train_steps=100,
        gradient_accumulation_steps=1,
        batch_size=2,
        checkpointing_steps=100,
        validation_steps=100,
        checkpoints_total_limit=None,
        ema=EMA(g, half_life_kimg=0),
        model=g,
        export=export,
        validate=None,
        checkpoint_bytes=lambda: 5 * 2**20,
    )
    return acc, loop


def _exported(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(b"w" * 1000)


WRITE_FAILURES = {  # how the writers in use report a full disk
    "torch zip writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1664 vs 1553"),
    "C++ stream": RuntimeError("basic_ios::clear: iostream error"),
    "OSError": OSError(28, "No space left on device"),
    "safetensors": __import__("safetensors").SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
}


@pytest.mark.parametrize("failure", sorted(WRITE_FAILURES))
@pytest.mark.parametrize("where", ["accelerate state", "export"])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, failure, where
):
    fail = {"now": False}

    def export(path):
        _exported(path)
        if fail["now"] and where == "export":
            raise WRITE_FAILURES[failure]

    acc, loop = _checkpointing_loop(tmp_path, export)
    loop.state.step = 1
    loop.save_checkpoint()
    real = acc.save_state

    def save_state(output_dir, **kwargs):
        real(output_dir, **kwargs)
        if where == "accelerate state":
            raise WRITE_FAILURES[failure]

    monkeypatch.setattr(acc, "save_state", save_state)
    fail["now"] = True
    loop.state.step = 2
    with pytest.raises(OSError) as err:
        loop.save_checkpoint()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no space left in {tmp_path / 'checkpoints'}, need ≈ "), message
    assert "checkpoint-1 and older are kept" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]


def test_the_final_export_appears_whole_or_not_at_all(tmp_path):
    """export_final writes beside the destination and renames: a full disk is one line and leaves the earlier folder
    (or none), never a half-written one."""
    from safetensors import SafetensorError

    full = {"disk": True}

    def export(path):
        _exported(path)
        if full["disk"]:
            (path / "weights.safetensors").write_bytes(b"half")
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'
            )

    acc, loop = _checkpointing_loop(tmp_path, export)
    final = tmp_path / "pipeline"
    with pytest.raises(OSError) as err:
        loop.export_final(final)
    assert str(err.value).startswith(
        f"no space left in {tmp_path}, need ≈ 5 MB for the final pipeline: nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no pipeline/, no temporary folder
    full["disk"] = False
    loop.export_final(final)
    assert (final / "weights.safetensors").read_bytes() == b"w" * 1000
    full["disk"] = True  # a second export that fails keeps the first one whole
    with pytest.raises(OSError, match=r"\(the earlier one is kept\)"):
        loop.export_final(final)
    assert (final / "weights.safetensors").read_bytes() == b"w" * 1000 and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["pipeline"]
