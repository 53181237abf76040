"""One run per workdir: an exclusive lock, `WORKDIR/lock`, held by process 0 while it trains.

The file holds the holder's {"pid", "host", "since"} (JSON). The lock itself is an
advisory `flock` on it, which the kernel drops when the holder dies, so a lock left by a
killed run is stale: the next run takes it over and says whose it was. On the holder's
own host a live pid also counts as held, for file systems where flock is not shared. A
run that finds the lock held stops at once (`WorkdirBusy`) before reading or writing
anything in the workdir, so it never truncates another run's metrics.jsonl nor saves
over its checkpoints.

With several processes, process 0 locks and tells the others the outcome (they all stop
together).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np
from jax.experimental import multihost_utils

from sabr_jax.errors import UserError

LOCK = "lock"


class WorkdirBusy(UserError):
    """Another live run holds the workdir."""


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a live process on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return holder["pid"] != os.getpid()


class WorkdirLock:
    """`with WorkdirLock(workdir, say):` own the workdir for the block's duration."""

    def __init__(self, workdir: str, say=print):
        self.path = os.path.join(os.path.abspath(workdir), LOCK)
        self.say = say
        self.fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        error = self._acquire() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if failed and error is None:
                raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another run (process 0 says so)")
        if error is not None:
            raise error
        return self

    def _acquire(self) -> WorkdirBusy | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = _alive_here(holder)
        except BlockingIOError:
            held = True
        if held:
            os.close(fd)
            return WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by another run: pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} since {holder.get('since', '?')} ({self.path}). Wait for it to end, "
                "stop it, or give another --workdir"
            )
        if holder:
            self.say(
                f"took over the lock of a run that is no longer running (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} since {holder.get('since', '?')}): {self.path}"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return None

    @staticmethod
    def _read(fd: int) -> dict:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        try:
            holder = json.loads(text) if text else {}
        except json.JSONDecodeError:
            holder = {"pid": "?", "host": "?", "since": f"(unreadable lock file: {text[:40]!r})"}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly, nothing stale to report
            os.close(self.fd)  # drops the flock
            self.fd = None
