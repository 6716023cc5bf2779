"""One writer per output folder: a lock file held by the main process of one run (``accelerate launch``).

The lock is ``DIR/.lock`` created atomically (``O_EXCL``) with the holder's host, pid and start time. The other
processes of the same launch share it: the main process takes it and broadcasts the outcome, so every process stops
together when it is taken. While a run holds it, a daemon thread touches the file every :data:`HEARTBEAT_SECONDS`.

A lock whose holder is gone is taken over, so that a preempted job resumes with no hand step: on the same host when
the holder's process no longer runs (pid and start time checked: a reused pid is not the holder), at once; from
another host (a cluster requeues a job elsewhere) when its heartbeat is older than :data:`STALE_AFTER_SECONDS`. Each
takeover is said in one line on stderr. A live holder's lock is never taken: the second run is refused, naming it.
Clocks of the hosts sharing a folder must agree to well within :data:`STALE_AFTER_SECONDS` (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 60.0  # how often a holder touches its lock
STALE_AFTER_SECONDS = 600.0  # a lock of another host not touched for this long belongs to a run that is gone
_beating: dict[Path, threading.Event] = {}  # lock path -> the event that stops its heartbeat


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


def _read(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text()
        holder = json.loads(text)
        return (holder if isinstance(holder, dict) else {}), text
    except (OSError, ValueError):
        return {}, ""


def _gone(holder: dict, *, age: float, host: str) -> str | None:
    """Why the lock's holder is gone (None: it may still run). ``age``: seconds since the lock was last touched."""
    pid = holder.get("pid")
    if holder.get("host") == host and isinstance(pid, int):
        return None if _alive(pid, holder.get("start")) else "a run that is no longer alive"
    beats = "heartbeat" in holder or not holder  # an unreadable lock: its writer died before finishing it
    if beats and age > STALE_AFTER_SECONDS:
        return f"a run whose lock has not been renewed for {age / 60:.0f} min"
    return None


def _take_over(path: Path, seen: str) -> bool:
    """Move the stale lock (whose text was ``seen``) out of the way; False if another run changed it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # removed meanwhile: free for O_EXCL
    try:
        if aside.read_text() == seen:
            return True
        with contextlib.suppress(FileExistsError):  # a fresh lock of another run: put it back
            os.link(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                os.utime(path)


def try_lock(directory: str | os.PathLike, *, purpose: str) -> str | None:
    """Create ``directory/.lock`` (taking over one whose holder is gone, with a line on stderr) and start its heartbeat;
    None on success, else the one-line reason it is taken."""
    path = Path(directory) / LOCK_NAME
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "purpose": purpose,
        "heartbeat": HEARTBEAT_SECONDS,
    }
    for _ in range(3):  # a takeover raced by another run: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, text = _read(path)
            with contextlib.suppress(FileNotFoundError):
                age = time.time() - path.stat().st_mtime
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
                gone = _gone(holder, age=age, host=me["host"])
                if gone is None:
                    if holder.get("host") == me["host"]:
                        after = "it is taken over once that process has ended"
                    elif "heartbeat" in holder:
                        after = (
                            f"its lock was renewed {age:.0f} s ago, and is taken over once not renewed for "
                            f"{STALE_AFTER_SECONDS / 60:.0f} min"
                        )
                    else:
                        after = f"its lock has no heartbeat (an older version): if that run is gone, `rm {path}`"
                    return (
                        f"{directory} is in use by another run ({who}): wait for it to finish (or stop it), or choose "
                        f"another output directory; {after}"
                    )
                if _take_over(path, text):
                    sys.stderr.write(f"took over the lock of {directory} from {gone} ({who})\n")
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        stop = threading.Event()
        _beating[path] = stop
        threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name=f"lock heartbeat {path}").start()
        return None
    return f"{directory} is being taken over by another run at the same time: re-run the same command"


def unlock(directory: str | os.PathLike) -> None:
    """Stop the heartbeat and remove the lock if this process holds it."""
    path = Path(directory) / LOCK_NAME
    stop = _beating.pop(path, None)
    if stop is not None:
        stop.set()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


@contextlib.contextmanager
def locked(
    directory: str | os.PathLike,
    *,
    purpose: str,
    is_main_process: bool,
    broadcast: Callable[[str | None], str | None] = lambda x: x,
) -> Iterator[None]:
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
            reason = (
                f"output directory {directory} is not writable ({exc.strerror or exc}): "
                "choose a directory you can write to"
            )
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
