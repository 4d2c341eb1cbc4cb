"""Run directories: one run at a time in each, names that never collide, and the
comparison of a run's recorded settings with new ones (for resume).

Nothing here imports torch: ``flatten`` and ``diff`` are pure functions of JSON data.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

LOCK_FILE = ".lock"
RUN_MARKERS = ("config.json", "metrics.jsonl")  # files that make a directory a run's
RUNS_ROOT = Path("runs")
TIME_FORMAT = "%Y%m%d-%H%M%S"
MAX_SAME_SECOND = 1000  # suffixes tried for runs of one name started in the same second
NAME_KEY = "name"  # lists of dicts with unique values of this key are flattened by it

Difference = tuple[str, Optional[str], Optional[str]]


class RunDirError(Exception):
    """A run directory that cannot be used: in use, already a run's, or not creatable."""


class Lock:
    """An exclusive lock on a run directory, held until ``release`` or the process ends."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: Optional[int] = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (idempotent). The lock file stays; it is the lock's handle."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone; the OS lets go anyway
            pass


def lock(out_dir: Path) -> Lock:
    """Take the exclusive lock of ``out_dir`` (created if missing): ``flock`` on
    ``out_dir/.lock``. RunDirError, naming the holder's pid, if another run holds it.

    The lock belongs to the open file, so a second ``lock`` of the same directory is
    refused even within one process; it goes away with the process however it ends.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        who = f" (pid {holder})" if holder else ""
        raise RunDirError(f"{out_dir} is in use by another run{who}; wait for it to finish "
                          "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Lock(path, fd)


def is_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a run (its config or its metrics)."""
    return any((Path(out_dir) / m).exists() for m in RUN_MARKERS)


def refuse_existing(out_dir: Path) -> None:
    """RunDirError if ``out_dir`` already holds a run: a new run must not mix into it."""
    if is_run(out_dir):
        raise RunDirError(f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
                          "or choose another --out")


def default_out(name: str, root: Path = RUNS_ROOT) -> Path:
    """A new, empty directory ``root/<name>-<time>`` (created here, so that it is ours).

    Runs started in the same second get ``-2``, ``-3``, ... appended: each candidate is
    created with an exclusive ``mkdir``, so two processes can never get the same one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{time.strftime(TIME_FORMAT)}"
    for n in range(1, MAX_SAME_SECOND + 1):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"{MAX_SAME_SECOND} runs named {base!r} in {root} this second; name one with --out")
