"""Folders that appear whole or not at all, and a full disk told in one line.

A folder a command hands to users (the final ``pipeline/``, an ``export_stock.py`` folder) is written under a hidden
temporary name beside it and renamed into place when complete, so that a kill or a full disk leaves the earlier
folder (or none), never a mix of old and new files. Writers report a full disk in many ways (``OSError`` ENOSPC,
torch's zip writer ``unexpected pos`` / ``file write failed``, C++ streams ``basic_ios::clear``, safetensors'
``SafetensorError ... StorageFull``); :func:`is_disk_full` recognises them all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

# What the writers in use say when a write did not fit (torch.save's zip writer, C++ iostreams, safetensors' Rust io).
_FULL = (
    "No space left",
    "Disk quota exceeded",
    "StorageFull",
    "file write failed",
    "unexpected pos",
    "basic_ios::clear",
    "iostream error",
)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write that did not fit on the disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
            if any(text in str(exc) for text in _FULL):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_leftovers(final: Path) -> None:
    """Temporaries of killed writers of ``final``: a half-written new folder goes; an old one moved aside just before a
    kill is put back when ``final`` is missing (the kill fell between the two renames of :func:`replace_folder`)."""
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue  # another live writer's
            if kind == "old" and not final.exists():
                os.rename(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``, replacing an existing one (two renames: a kill between them leaves
    the old folder beside, restored by the next :func:`atomic_folder` of ``final``)."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def no_space(folder: str | os.PathLike, *, need_bytes: int, what: str, kept: str) -> OSError:
    """The one-line full-disk error: where, how much, what is kept, and the fix."""
    return OSError(
        f"no space left in {folder}, need ≈ {max(need_bytes, 1) / 2**20:.0f} MB for {what}: {kept}; "
        "free space and re-run the same command"
    )


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, *, need_bytes: Callable[[], int], what: str) -> Iterator[Path]:
    """``with atomic_folder(out / "pipeline", ...) as tmp: write(tmp)``: the folder appears at ``final`` only when the
    block completes; on failure nothing changes there, and a full disk is one line naming the folder and
    ``need_bytes()`` (an estimate of what ``what`` takes)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        replace_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(exc):
            raise
        kept = f"nothing was written to {final}" + (" (the earlier one is kept)" if final.exists() else "")
        raise no_space(final.parent, need_bytes=need_bytes(), what=what, kept=kept) from None
