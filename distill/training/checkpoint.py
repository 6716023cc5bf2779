"""Run-directory checkpoints: ``checkpoints/checkpoint-<step>`` written atomically, pruned to a limit.

accelerate's ``save_state`` writes models, optimisers, RNG states and registered objects; this module
only picks names, renames a finished temporary directory into place (a kill mid-save leaves the
previous checkpoint as the latest) and finds the one to resume from.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> newest finished checkpoint (None when there is none); ``none`` -> None; else a path."""
    if resume_from_checkpoint in (None, "", "none", "None"):
        return None
    if resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {path} does not exist: pass 'latest', 'none' or a checkpoint directory")
    return path


def temporary_dir(output_dir: str | os.PathLike, step: int, *, clear: bool) -> Path:
    """Where checkpoint ``step`` is written before ``finalize``; ``clear`` (main process) removes a stale one."""
    root = Path(output_dir) / "checkpoints"
    tmp = root / f".tmp-checkpoint-{step}"
    if clear:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    return tmp


def finalize(output_dir: str | os.PathLike, tmp: Path, step: int, *, total_limit: int | None) -> Path:
    """Rename a fully written checkpoint into place and delete the oldest beyond ``total_limit``."""
    final = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
