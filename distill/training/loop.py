"""The training loop shared by the trainers (``train_student.py``, ``train_gan.py``, ``train_latent_lpips.py``).

:class:`TrainLoop` owns what every GAN trainer repeats: the counters saved with each checkpoint
(:class:`TrainState`: steps and images seen), resuming, one optimiser step of a loss phase over
gradient-accumulation micro-batches (:meth:`TrainLoop.phase`; the same micro-batch numbering keys the
data order and the random streams, so a resumed run continues them), the NaN/inf stop, the per-step
``stats.jsonl`` record, the EMA update, and the checkpoint / validation cadence. Its own states go into each checkpoint
as safetensors (the EMA) and JSON (the counters, states a trainer adds with :meth:`TrainLoop.keep`), never as pickles:
resuming runs no code from a checkpoint (``distill/training/checkpoint.py`` verifies its files first). What a step
computes stays in the trainer, as callbacks. A run may have stages (E-LatentLPIPS: classifier, then calibration), each
with its own model, optimiser and step count (:meth:`TrainLoop.begin_stage`); checkpoints and ``stats.jsonl`` count the
steps of the whole run.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from distill.core.atomic import atomic_folder, folder_bytes
from distill.training import checkpoint as ckpt
from distill.training.seeds import step_generator

# One micro-batch: (m, generator) -> (output kept for later phases, {term: weighted loss}, loss to backpropagate).
MicroStep = Callable[[int, torch.Generator], "tuple[Any, dict[str, torch.Tensor], torch.Tensor]"]
# Terms computed once per step rather than per micro-batch (lazy R1 on one sample of micro-batch 0).
PER_STEP_TERMS = ("d_r1",)


def micro_batch_loss(terms: dict[str, torch.Tensor], *, num_micro_batches: int) -> torch.Tensor:
    """The loss one micro-batch backpropagates under gradient accumulation: batch-mean terms / M (summed over the
    M micro-batches, the mean over the step's batch), per-step terms at full weight, so that R1's weight r1_gamma
    does not shrink to r1_gamma / M. Terms named ``*_logit`` are logged means, not losses."""
    return sum(
        v if k in PER_STEP_TERMS else v / num_micro_batches for k, v in terms.items() if not k.endswith("_logit")
    )


POSITION_FILE = "trainer_state.json"  # in each checkpoint: where the run was, readable before anything is prepared
EMA_FILE = "ema.safetensors"  # in each checkpoint with an EMA: its weights


class TrainState:
    """Counters saved with every checkpoint (``trainer_state.json``): the step of the current stage, images seen, and
    for a run with stages the stage's name and the steps of the stages before it (``offset``)."""

    def __init__(self):
        self.step, self.nimg, self.stage, self.offset = 0, 0, "", 0

    @property
    def global_step(self) -> int:
        return self.offset + self.step

    def state_dict(self):
        return {"step": self.step, "nimg": self.nimg, "stage": self.stage, "offset": self.offset}

    def load_state_dict(self, state):
        self.step, self.nimg = int(state["step"]), int(state.get("nimg", 0))
        self.stage, self.offset = str(state.get("stage", "")), int(state.get("offset", 0))

    def position(self) -> dict:
        """What ``trainer_state.json`` holds (:func:`read_position`)."""
        return {"stage": self.stage, "step": self.step, "global_step": self.global_step, "nimg": self.nimg}


def read_position(checkpoint: Path) -> dict:
    """``{"stage", "step", "global_step", "nimg"}`` of a checkpoint: which stage to build before it is loaded."""
    return json.loads((Path(checkpoint) / POSITION_FILE).read_text())


def micro_steps(step: int, accumulation: int) -> range:
    """Global numbers of optimiser step ``step``'s micro-batches: what the data order and random streams are keyed
    by."""
    return range(step * accumulation, (step + 1) * accumulation)


class TrainLoop:
    """``loop = TrainLoop(accelerator, ...)``; ``loop.resume(...)``; then per step: the trainer's phases through
    :meth:`phase`, then :meth:`end_step`. ``export(path)`` writes the EMA model (or the model, without EMA) where a
    checkpoint keeps it, ``OUT/checkpoints/checkpoint-N/<export_name>`` (main process); ``validate(step)`` scores
    and draws samples (None: no validation); ``checkpoint_bytes()`` estimates a checkpoint's size before the first
    one exists (for the disk-full message). ``checkpointing_steps`` 0: at the end of each stage only."""

    def __init__(
        self,
        accelerator,
        *,
        output_dir: str | Path,
        seed: int,
        max_train_steps: int,
        gradient_accumulation_steps: int,
        batch_size: int,
        checkpointing_steps: int,
        validation_steps: int,
        checkpoints_total_limit: int | None,
        ema,
        model,
        export: Callable[[Path], None],
        validate: Callable[[int], None] | None,
        checkpoint_bytes: Callable[[], int],
        export_name: str = "pipeline",
    ):
        self.accelerator = accelerator
        self.out = Path(output_dir)
        self.stats_path = self.out / "stats.jsonl"
        self.seed, self.rank = seed, accelerator.process_index
        self.max_train_steps, self.accumulation = max_train_steps, gradient_accumulation_steps
        self.images_per_step = batch_size * accelerator.num_processes * gradient_accumulation_steps
        self.checkpointing_steps, self.validation_steps = checkpointing_steps, validation_steps
        self.total_limit = checkpoints_total_limit
        self.ema, self.model = ema, model  # model: the prepared (DDP) module the EMA follows
        self.export, self.validate, self.checkpoint_bytes, self.export_name = (
            export,
            validate,
            checkpoint_bytes,
            export_name,
        )
        self.state = TrainState()
        self.kept: dict[str, Any] = {}
        self.bar = None
        self._step_start = time.perf_counter()

    def keep(self, name: str, obj) -> None:
        """Save ``obj.state_dict()`` (JSON-able; called on every process, so it may gather) as ``<name>.json`` in each
        checkpoint and give it back to ``obj.load_state_dict`` on resume: a trainer's own state, such as stream
        positions."""
        self.kept[name] = obj

    def begin_stage(
        self,
        name: str,
        *,
        max_train_steps: int,
        batch_size: int,
        model,
        export: Callable[[Path], None],
        checkpoint_bytes: Callable[[], int],
    ) -> None:
        """Start stage ``name`` with its own (prepared) model and step count, after the stages already run here; a
        checkpoint of this stage loaded next by :meth:`resume` puts the counters back where they were."""
        if self.state.stage and self.state.stage != name:
            self.state.offset += self.state.step
            self.state.step = 0
        self.state.stage = name
        self.max_train_steps, self.model, self.export, self.checkpoint_bytes = (
            max_train_steps,
            model,
            export,
            checkpoint_bytes,
        )
        self.images_per_step = batch_size * self.accelerator.num_processes * self.accumulation

    @property
    def done(self) -> bool:
        return self.state.step >= self.max_train_steps

    def micro_steps(self) -> range:
        return micro_steps(self.state.step, self.accumulation)

    def resume(self, resume_from_checkpoint: str) -> Path | None:
        """Load the checkpoint ``resume_from_checkpoint`` resolves to (None: start over); the main process cuts
        ``stats.jsonl`` back to it (the steps past it are about to run again)."""
        resume = ckpt.resolve_resume(self.out, resume_from_checkpoint)
        if resume is not None:
            self._load(resume)
            stage = f"{self.state.stage} " if self.state.stage else ""
            self.accelerator.print(f"resumed {stage}from {resume} at step {self.state.step} ({self.state.nimg} images)")
        if self.accelerator.is_main_process:
            ckpt.truncate_stats(self.stats_path, step=self.state.global_step if resume is not None else -1)
        return resume

    def _load(self, resume: Path) -> None:
        """accelerate's state, then the loop's own, from a checkpoint whose files are the ones recorded when it was
        saved
        (checked by the main process before anything is opened; every process stops on its verdict)."""
        acc = self.accelerator
        reason = ckpt.verify_files(resume) if acc.is_main_process else None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            reason = broadcast_object_list([reason])[0]
        if reason is not None:
            raise ValueError(reason)
        try:
            acc.load_state(str(resume))
            position = read_position(resume)
            self.state.load_state_dict({**position, "offset": position["global_step"] - position["step"]})
            if self.ema is not None:
                self.ema.load(resume / EMA_FILE)
            for name, obj in self.kept.items():
                obj.load_state_dict(json.loads((resume / f"{name}.json").read_text()))
        except (SafetensorError, pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, OSError) as exc:
            # Damaged past what its record shows (bytes changed in a safetensors file), or not this run's shapes.
            raise ValueError(ckpt.unloadable(resume, exc)) from None

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        self.bar = tqdm(
            total=self.max_train_steps,
            initial=self.state.step,
            desc=self.state.stage or "train",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        self._step_start = time.perf_counter()
        try:
            yield
        finally:
            self.bar.close()  # ends the progress line, so an error message starts on its own line

    def phase(
        self,
        *,
        purpose: str,
        model,
        optimizer,
        params: Iterable[torch.nn.Parameter],
        micro_step: MicroStep,
        logs: dict[str, torch.Tensor],
        max_grad_norm: float,
        per_step_terms: tuple[str, ...] = PER_STEP_TERMS,
    ) -> list:
        """One optimiser step of ``model`` over this step's micro-batches: ``micro_step(m, generator)`` for each
        (``generator``: the (seed, rank, micro-batch, ``purpose``) stream), gradients synchronised across processes
        on the last one only, then clipping and the optimiser step, skipped (the run stops) when the gradient norm
        is not finite. Terms are summed into ``logs`` on the device as micro-batch means, except ``per_step_terms``
        (computed once per step); :meth:`end_step` reads them. Returns the micro-steps' outputs."""
        acc = self.accelerator
        micro = list(self.micro_steps())
        outputs = []
        for m, index in enumerate(micro):
            generator = step_generator(seed=self.seed, rank=self.rank, step=index, purpose=purpose)
            sync = contextlib.nullcontext() if m + 1 == len(micro) else acc.no_sync(model)
            with sync, acc.autocast():
                output, terms, loss = micro_step(m, generator)
                acc.backward(loss)
            outputs.append(output)
            for k, v in terms.items():  # kept on the device: reading a value would wait for the GPU
                v = v.detach().float() / (1 if k in per_step_terms else len(micro))
                logs[k] = logs[k] + v if k in logs else v
        # A NaN/inf loss makes the gradient norm non-finite; the norm is the same on every process (DDP averaged
        # the gradients), so all stop together without a collective of their own. Clipping off: an infinite bound.
        norm = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        # With fp16 loss scaling an inf norm is an overflow the scaler skips by itself; a NaN loss shows in end_step.
        if acc.scaler is None and not torch.isfinite(norm):
            self._stop(logs, reduced=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outputs

    def _stop(self, logs: dict, *, reduced: bool) -> None:
        """Raise the one-line NaN/inf stop naming the step and the non-finite terms (of any process); checkpoints stay
        as they are. ``reduced``: ``logs`` are already the process means (floats), else this process's device values."""
        keys = sorted(logs)
        if reduced:
            bad = [k for k in keys if not math.isfinite(logs[k])]
        else:
            flags = torch.stack([~torch.isfinite(logs[k]) for k in keys]).float() if keys else torch.zeros(0)
            bad = [k for k, f in zip(keys, self.accelerator.reduce(flags, "max").tolist()) if f > 0]
        last = ckpt.checkpoint_dirs(self.out)
        step = f"{self.state.global_step}" + (
            f" ({self.state.stage} step {self.state.step})" if self.state.stage else ""
        )
        where = (
            f"non-finite loss at step {step} in term {', '.join(bad)}"
            if bad
            else f"non-finite gradient norm at step {step} (every loss term finite)"
        )
        raise ValueError(
            f"{where}: stopped; last good checkpoint: {last[-1] if last else 'none yet'} "
            "(lower the learning rates or the term's weight, then resume)"
        )

    def end_step(self, logs: dict[str, torch.Tensor], *, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Count the step, update the EMA, log the process-mean terms (+ ``extra``, already global, and ``step_time``:
        this step's wall-clock seconds, reading its data included, checkpoints and validation not) to the trackers and
        ``stats.jsonl`` (a non-finite one stops the run), then checkpoint and validate when due. Returns the logged
        terms."""
        acc, state = self.accelerator, self.state
        keys = sorted(logs)  # one collective and one read of the device for all terms
        values = acc.reduce(torch.stack([logs[k] for k in keys]), "mean").tolist() if keys else []
        logs = dict(zip(keys, values))
        if not all(map(math.isfinite, values)):
            self._stop(logs, reduced=True)
        state.step += 1
        state.nimg += self.images_per_step
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model), self.images_per_step, nimg=state.nimg)
        logs.update(extra or {})
        logs["step_time"] = time.perf_counter() - self._step_start
        self.record(logs)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
            self.bar.update(1)
        if self._due(self.checkpointing_steps):
            self.save_checkpoint()
        if self.validate is not None and self._due(self.validation_steps):
            self.validate(state.step)
        self._step_start = time.perf_counter()
        return logs

    def record(self, values: dict[str, float]) -> None:
        """``values`` (global numbers) to the trackers and a ``stats.jsonl`` row at the current step (the stage's
        name and step beside the run's, in a run with stages)."""
        state = self.state
        where = {"stage": state.stage, "stage_step": state.step} if state.stage else {}
        prefix = f"{state.stage}/" if state.stage else ""
        self.accelerator.log({**{prefix + k: v for k, v in values.items()}, "nimg": state.nimg}, step=state.global_step)
        if self.accelerator.is_main_process:
            with open(self.stats_path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "nimg": state.nimg, **where, **values}) + "\n")

    def _due(self, every: int) -> bool:
        return (every > 0 and self.state.global_step % every == 0) or self.state.step == self.max_train_steps

    def save_checkpoint(self) -> None:
        """``checkpoints/checkpoint-<step>``: accelerate's state (models, optimisers, RNGs), the loop's (EMA weights,
        counters, kept states) and the EMA model exported beside it, the record of its files last; written to a
        temporary folder and renamed when complete."""
        acc, step = self.accelerator, self.state.global_step
        tmp = ckpt.temporary_dir(self.out, step, clear=acc.is_main_process)
        acc.wait_for_everyone()
        # A failed or interrupted save removes its partial directory; earlier checkpoints stay as they are.
        with ckpt.partial_save(self.out, tmp, estimate_bytes=self.checkpoint_bytes):
            acc.save_state(str(tmp))
            check_replicas(acc, self.model, step)  # also the barrier after every process's random-state file
            kept = {name: obj.state_dict() for name, obj in self.kept.items()}
            if acc.is_main_process:
                self.export(tmp / self.export_name)
                if self.ema is not None:
                    self.ema.save(tmp / EMA_FILE)
                (tmp / POSITION_FILE).write_text(json.dumps(self.state.position()) + "\n")
                for name, state in kept.items():
                    (tmp / f"{name}.json").write_text(json.dumps(state) + "\n")
                ckpt.record_files(tmp)
                ckpt.finalize(self.out, tmp, step, total_limit=self.total_limit)
        acc.wait_for_everyone()

    def export_final(self, path: Path) -> None:
        """The run's result, ``export(path)``, written to a temporary folder beside ``path`` and renamed into place when
        complete (main process): a kill or a full disk leaves no half-written folder, a full disk one line."""
        done = ckpt.checkpoint_dirs(self.out)
        need = lambda: folder_bytes(done[-1] / self.export_name) if done else self.checkpoint_bytes()  # noqa: E731
        with atomic_folder(path, need_bytes=need, what=f"the final {Path(path).name}") as tmp:
            self.export(tmp)


def state_bytes(*, models: list, optimizers: list) -> int:
    """Rough size of one checkpoint: the weights of ``models`` (None skipped) and the optimisers' states."""
    tensors = [t for m in models if m is not None for t in m.state_dict().values()]
    for opt in optimizers:
        if opt is not None:
            tensors += [t for s in opt.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_replicas(accelerator, model, step: int) -> None:
    """DDP keeps replicas equal by construction; verify it at every checkpoint (cheap, catches bugs)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(total)
    if (sums - sums[0]).abs().max().item() > 1e-6 * max(1.0, sums[0].abs().item()):
        raise RuntimeError(f"process replicas diverged at step {step}: parameter sums {sums.tolist()}")
