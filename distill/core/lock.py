"""One writer per output folder: a lock file held by the main process of one run (``accelerate launch``).

The lock is ``DIR/.lock`` created atomically (``O_EXCL``) with the holder's host, pid and start time.
The other processes of the same launch share it: the main process takes it and broadcasts the
outcome, so every process stops together when it is taken. A lock whose process is gone (``kill -9``,
a crashed machine) is reported as stale with the command that clears it, never removed silently:
only the user knows that no other run still writes there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

LOCK_NAME = ".lock"


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), so a reused pid is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return start is None or _process_start(pid) in (None, start)


def try_lock(directory: str | os.PathLike, *, purpose: str) -> str | None:
    """Create ``directory/.lock``; None on success, else the one-line reason it is taken."""
    path = Path(directory) / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "purpose": purpose}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = {}
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"], holder.get("start")):
            return (f"{directory} is locked by a run that is no longer alive ({who}): if no other run writes there, "
                    f"clear the stale lock with `rm {path}` and re-run the same command")
        return (f"{directory} is in use by another run ({who}): wait for it to finish (or stop it), or choose another "
                f"output directory; if that run is gone, clear the lock with `rm {path}`")
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    return None


def unlock(directory: str | os.PathLike) -> None:
    """Remove the lock if this process holds it."""
    path = Path(directory) / LOCK_NAME
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


@contextlib.contextmanager
def locked(directory: str | os.PathLike, *, purpose: str, is_main_process: bool,
           broadcast: Callable[[str | None], str | None] = lambda x: x) -> Iterator[None]:
    """Create ``directory`` and hold its lock for the block (the main process takes it; ``broadcast`` shares the
    outcome with the other processes). Folders this call created are removed again if they end up holding no file."""
    directory = Path(directory)
    top = directory  # the outermost folder this call creates
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    created = not directory.exists()
    reason = None
    if is_main_process:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            reason = try_lock(directory, purpose=purpose)
        except OSError as exc:
            reason = f"output directory {directory} is not writable ({exc.strerror or exc}): choose a directory you can write to"
    reason = broadcast(reason)
    try:
        if reason is not None:
            raise OSError(reason)
        yield
    finally:
        if is_main_process:
            unlock(directory)
            if created and top.is_dir() and not any(p.is_file() for p in top.rglob("*")):
                shutil.rmtree(top, ignore_errors=True)
