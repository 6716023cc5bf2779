"""Run-directory checkpoints: ``checkpoints/checkpoint-<step>`` written atomically, pruned to a limit.

accelerate's ``save_state`` writes models, optimisers, RNG states and registered objects; this module
only picks names, renames a finished temporary directory into place (a kill mid-save leaves the
previous checkpoint as the latest) and finds the one to resume from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> newest finished checkpoint (None when there is none); ``none`` -> None; a bare
    ``checkpoint-N`` -> that checkpoint of ``output_dir``; else a path."""
    if resume_from_checkpoint in (None, "", "none", "None"):
        return None
    if resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and _NAME.match(resume_from_checkpoint):  # a bare name, as diffusers' scripts take it
        for candidate in (Path(output_dir) / "checkpoints" / resume_from_checkpoint, Path(output_dir) / resume_from_checkpoint):
            if candidate.is_dir():
                return candidate
        names = ", ".join(p.name for p in checkpoint_dirs(output_dir)) or "none"
        raise FileNotFoundError(f"resume_from_checkpoint {resume_from_checkpoint} is not in {Path(output_dir) / 'checkpoints'} "
                                f"(finished checkpoints: {names}): pass one of them, 'latest' or 'none'")
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {path} does not exist: pass 'latest', 'none', a checkpoint name or directory")
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


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's zip writer reports a full disk as a RuntimeError ("... file write failed").
    return isinstance(exc, RuntimeError) and ("No space left" in str(exc) or "file write failed" in str(exc))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def partial_save(output_dir: str | os.PathLike, tmp: Path, *, estimate_bytes: Callable[[], int]) -> Iterator[None]:
    """Remove the half-written ``tmp`` checkpoint if the block fails or is interrupted; a full disk becomes one line
    saying how much room a checkpoint needs (the last finished one, or ``estimate_bytes()`` before there is one)."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(exc):
            raise
        done = checkpoint_dirs(output_dir)
        need = _size(done[-1]) if done else estimate_bytes()
        kept = f"{done[-1].name} and older are kept" if done else "no checkpoint was saved yet"
        raise OSError(
            f"no space left in {tmp.parent}, need ≈ {need / 2**20:.0f} MB for a checkpoint: the partial one was deleted, "
            f"{kept}; free space (or lower checkpoints_total_limit) and re-run the same command to resume",
        ) from None


def truncate_stats(path: str | os.PathLike, *, step: int) -> None:
    """Drop the ``stats.jsonl`` records past ``step`` (a resumed run writes those steps again)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if record_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
