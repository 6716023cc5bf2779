"""A run folder's ``config.yaml``: what a resumed run may change, and the record of what it did change.

A resumed run continues the run its folder holds, so every key that defines that run (model, data, seed, batch,
losses, optimiser, precision) must keep its saved value; keys that only say how long it runs, how often it saves,
validates and reports, where the folder is, how data is read or how memory is spent may change (:data:`MAY_CHANGE`).
Both trainers (``train_student.py``, ``train_gan.py``) check a resume here before anything heavy loads, and
append each allowed change to ``config_changes.jsonl`` (the step it took effect at) when they rewrite ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from distill.core.config import config_dict, save_config

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"

# Keys a resumed run may set anew, and why the run stays the same run.
MAY_CHANGE = {
    "max_train_steps": "how long it runs",
    "checkpointing_steps": "how often it saves",
    "checkpoints_total_limit": "how many checkpoints it keeps",
    "resume_from_checkpoint": "where it resumes from",
    "output_dir": "where the folder is (a moved folder)",
    "validation_steps": "how often it validates",
    "validation_prompts": "what validation draws",
    "num_validation_seeds": "what validation draws",
    "validation_prompt_file": "what validation draws",
    "validation_images": "what validation draws",
    "validation_rows": "what validation draws",
    "report_to": "where it reports",
    "tracker_project_name": "where it reports",
    "num_workers": "how data is read (the same batches)",
    "text_cache_mb": "how captions are encoded (the same conditioning)",
    "gradient_checkpointing": "memory for compute (the same gradients)",
    "d_gradient_checkpointing": "memory for compute (the same gradients)",
    "ema_device": "where the EMA copy lives (the same values)",
    "pairs": "where the pairs are (checked by their content)",
    "teacher": "how the teacher is spelled (checked by its content)",
    "revision": "how the teacher is spelled (checked by its content)",
    "variant": "how the teacher is spelled (checked by its content)",
    "push_to_hub": "what happens after the run",
    "hub_model_id": "what happens after the run",
    "hub_token": "what happens after the run",
    "hub_private_repo": "what happens after the run",
}


def saved_config(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs (a key only one side knows, from another version of a schema, is not compared)."""
    return {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k] and not k.endswith("_token")}


def check_resume(output_dir: str | os.PathLike, *, config: dict) -> None:
    """Refuse to resume ``output_dir`` with a value that differs from its ``config.yaml`` for a key that defines the run
    (any key not in :data:`MAY_CHANGE`), in one line listing each change and the fix. ``config``: the resolved config
    (:func:`distill.core.config.config_dict`, defaults per student and the launcher's precision filled in)."""
    old = saved_config(output_dir)
    if old is None:
        return
    refused = {k: v for k, v in changes(old, config).items() if k not in MAY_CHANGE}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(
            f"{output_dir} holds a run made with another config ({listed}): these define the run, so resume with "
            "the original values, or choose a new output_dir (a resume may change max_train_steps, "
            "checkpointing_steps, "
            "validation_steps, report_to, num_workers and the other keys docs/errors-and-flags.md lists)"
        )


def save_run_config(config: Any, output_dir: str | os.PathLike, *, step: int) -> None:
    """Write ``config.yaml``; a run resumed at ``step`` (> 0) first appends the keys it changed, with their old and new
    values, to ``config_changes.jsonl``; a run started over (step 0) clears that record."""
    out = Path(output_dir)
    new = config_dict(config)
    old = saved_config(out)
    if step == 0:
        (out / CHANGES_FILE).unlink(missing_ok=True)
    elif old is not None and (changed := changes(old, new)):
        record = {
            "step": step,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "changes": {k: list(v) for k, v in changed.items()},
        }
        with open(out / CHANGES_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    save_config(config, out / CONFIG_FILE)
