"""One live run per model_dir: `model_dir/.t5lite.lock`.

Two runs writing one model_dir delete each other's in-progress checkpoints and interleave
their metrics, so the second one must fail at once. The lock file records who holds it (pid,
host, process start time) and is touched every `heartbeat_s` seconds. A lock whose holder is
gone is taken over with a warning: on the same host when the pid no longer runs (or runs a
different process), on another host when the heartbeat is older than `stale_after_s`.
"""

import json
import logging
import os
import socket
import threading
import time
from typing import Optional

from t5lite.errors import UserError
from t5lite.fileio import write_text_atomic

LOCK_NAME = ".t5lite.lock"
log = logging.getLogger(__name__)


def _process_start_time(pid: int) -> Optional[str]:
    """Linux: the process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start_time: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start_time(pid)
    return start_time is None or now is None or now == start_time


class ModelDirLock:
    """`with ModelDirLock(model_dir):` holds the lock (creating model_dir) until the block ends."""

    def __init__(self, model_dir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.model_dir = os.path.abspath(model_dir)
        self.path = os.path.join(self.model_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._record = {"pid": os.getpid(), "host": socket.gethostname(),
                        "start_time": _process_start_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ModelDirLock":
        os.makedirs(self.model_dir, exist_ok=True)
        if not self._create():
            holder = self._holder()
            if self._alive(holder):
                raise UserError(f"model_dir {self.model_dir} is in use by another run (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('since')}); wait for it or stop it, or "
                                "choose another --model_dir")
            log.warning("taking over the lock of %s from a run that is no longer alive (pid %s on %s, since %s)",
                        self.model_dir, holder.get("pid"), holder.get("host"), holder.get("since"))
            self._write()
        self._thread = threading.Thread(target=self._beat, name="t5lite-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._holder() == self._record:
            os.remove(self.path)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record, f)
        return True

    def _write(self) -> None:
        write_text_atomic(self.path, json.dumps(self._record))

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # vanished, or half-written by a process that died while writing it

    def _alive(self, holder: dict) -> bool:
        if not holder:
            return self._age() < self.stale_after_s  # unreadable: trust only a recent file
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"], holder.get("start_time"))
        return self._age() < self.stale_after_s

    def _age(self) -> float:
        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return float("inf")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass
