"""Run-directory checkpoints: ``checkpoints/checkpoint-<step>`` written atomically, recorded file by file, pruned to a
limit, verified before anything in them is loaded.

accelerate's ``save_state`` writes models (safetensors), optimisers and RNG states (torch pickles, which accelerate
reads back with ``weights_only=True``); the trainer's own states (EMA, counters, stream positions) are safetensors and
JSON written by :class:`distill.training.loop.TrainLoop`, never pickles. This module picks names, records every
file's size and (for all but safetensors) SHA-256 in ``checkpoint_files.json`` when the checkpoint is complete,
renames the finished temporary directory into place (a kill mid-save leaves the previous checkpoint as the latest),
finds the one to resume from, and refuses one whose files are not those recorded (a truncated or altered file, a
pickle put there by someone else) before accelerate opens any of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from distill.core.atomic import folder_bytes, is_disk_full

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
        for candidate in (
            Path(output_dir) / "checkpoints" / resume_from_checkpoint,
            Path(output_dir) / resume_from_checkpoint,
        ):
            if candidate.is_dir():
                return candidate
        names = ", ".join(p.name for p in checkpoint_dirs(output_dir)) or "none"
        raise FileNotFoundError(
            f"resume_from_checkpoint {resume_from_checkpoint} is not in {Path(output_dir) / 'checkpoints'} "
            f"(finished checkpoints: {names}): pass one of them, 'latest' or 'none'"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume_from_checkpoint {path} does not exist: pass 'latest', 'none', a checkpoint name or directory"
        )
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


@contextlib.contextmanager
def partial_save(output_dir: str | os.PathLike, tmp: Path, *, estimate_bytes: Callable[[], int]) -> Iterator[None]:
    """Remove the half-written ``tmp`` checkpoint if the block fails or is interrupted; a full disk becomes one line
    saying how much room a checkpoint needs (the last finished one, or ``estimate_bytes()`` before there is one),
    whichever
    way the writer reported it (:func:`distill.core.atomic.is_disk_full`)."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(exc):
            raise
        done = checkpoint_dirs(output_dir)
        need = folder_bytes(done[-1]) if done else estimate_bytes()
        kept = f"{done[-1].name} and older are kept" if done else "no checkpoint was saved yet"
        raise OSError(
            f"no space left in {tmp.parent}, need ≈ {need / 2**20:.0f} MB for a checkpoint: the partial one was "
            "deleted, "
            f"{kept}; free space (or lower checkpoints_total_limit) and re-run the same command to resume",
        ) from None


FILES = "checkpoint_files.json"  # in each checkpoint: every file's size and digest, written last
# Files a loader could open: one in a checkpoint that its record does not list is refused, not ignored.
_LOADABLE = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".safetensors", ".py", ".json")


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def record_files(folder: str | os.PathLike) -> None:
    """Write ``folder/checkpoint_files.json``: each file's size, and its SHA-256 unless it is safetensors (a format that
    runs no code, checked by size: hashing the largest files twice per checkpoint would cost more than it protects)."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entry = {"bytes": path.stat().st_size}
        if path.suffix != ".safetensors":
            entry["sha256"] = _digest(path)
        files[path.relative_to(folder).as_posix()] = entry
    tmp = folder / f".{FILES}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / FILES)


def _fix(folder: Path) -> str:
    others = [p.name for p in checkpoint_dirs(folder.parent.parent) if p.resolve() != folder.resolve()]
    other = f"--resume_from_checkpoint {others[-1]}" if others else "--resume_from_checkpoint another checkpoint"
    return f"resume from another one ({other}; 'none' starts over) or delete it (rm -r {folder}) and re-run"


def verify_files(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` holds exactly the files its ``checkpoint_files.json`` records (sizes and digests), else the
    one-line reason it must not be loaded, with the fix."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / FILES).read_text())["files"]
    except FileNotFoundError:
        return (
            f"checkpoint {folder} has no {FILES} (written by an older version of this toolkit, or not by it), so its "
            f"pickled files cannot be checked and none is loaded: {_fix(folder)}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {folder} is damaged ({FILES} is unreadable): {_fix(folder)}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in recorded and name != FILES and path.suffix in _LOADABLE:
            return (
                f"checkpoint {folder} holds {name}, which this toolkit did not write there (not in its {FILES}); "
                "nothing "
                f"is loaded from it: remove {path} if you put it there, or {_fix(folder)}"
            )
    for name, entry in recorded.items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            now = "missing" if size is None else f"{size} bytes, {entry['bytes']} when saved"
            return f"checkpoint {folder} is damaged ({name}: {now}): {_fix(folder)}"
        if "sha256" in entry and _digest(path) != entry["sha256"]:
            return f"checkpoint {folder} is damaged or altered ({name} is not the file saved there): {_fix(folder)}"
    return None


def unloadable(folder: str | os.PathLike, exc: BaseException) -> str:
    """The one-line reason a verified checkpoint still failed to load (damaged past its recorded size, say)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"checkpoint {Path(folder)} cannot be loaded ({type(exc).__name__}: {first}): {_fix(Path(folder))}"


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
