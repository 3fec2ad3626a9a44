"""Preemption (SIGTERM: save, then exit 0) and dead-peer detection for multi-process runs.

One process: a Python SIGTERM handler sets a flag; the loop saves at the next step and stops.
Several processes: every process must save the SAME step, or the checkpoint is torn and the
collectives hang. JAX's preemption sync manager (started by jax.distributed.initialize)
catches SIGTERM on whichever process gets it and agrees on a step with all the others;
`reached_preemption_sync_point` turns true on that step everywhere. Its counter must start
equal on every process, so it counts steps of this invocation, not global steps.

A peer that dies leaves the survivors blocked in a collective. `Watchdog` ends such a process
with one line once no step has finished for `timeout_s` seconds.
"""

import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np

log = logging.getLogger(__name__)


class Preemption:
    """Install at the start of a run; `requested_before_start()` after set-up, `reached(n)` each step."""

    def __init__(self):
        self._flag = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. a test runner thread): no handler
            self._previous = None

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint, then exiting")
        self._flag = True

    @staticmethod
    def _synchronised() -> bool:
        """True when JAX's preemption sync manager is running (it took SIGTERM over from us)."""
        if jax.process_count() == 1:
            return False
        from jax._src import distributed
        return distributed.global_state.preemption_sync_manager is not None

    def requested_before_start(self) -> bool:
        """Whether any process got SIGTERM during start-up (collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self._flag]))))

    def reached(self, steps_this_run: int) -> bool:
        """Whether to save and stop after the `steps_this_run`-th step of this invocation."""
        if jax.process_count() == 1:
            return self._flag
        if self._synchronised():
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(steps_this_run))
        return self.requested_before_start()  # no sync manager: agree on the flag every step

    def uninstall(self) -> None:
        if self._previous is not None and not self._synchronised():
            try:
                signal.signal(signal.SIGTERM, self._previous)
            except ValueError:
                pass


class Watchdog:
    """Exits this process (code 1, one line) when `beat()` is not called for `timeout_s` seconds.

    Armed by the first `beat()`, so compilation before the first step does not count.
    """

    def __init__(self, timeout_s: Optional[float]):
        self.timeout_s = timeout_s
        self._last: Optional[float] = None
        self._step = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s:
            self._thread = threading.Thread(target=self._watch, name="t5lite-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self._last, self._step = time.monotonic(), step

    def pause(self) -> None:
        """Disarm until the next beat (checkpoint waits, evaluation that may legitimately be slow)."""
        self._last = None

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            if self._last is not None and time.monotonic() - self._last > self.timeout_s:
                fail(f"no training step finished for {self.timeout_s:.0f} s after step {self._step}: a peer "
                     "process has probably died or hung; restart the job (it resumes from the last checkpoint)")

    def close(self) -> None:
        self._stop.set()


def fail(message: str, code: int = 1) -> None:
    """Prints one line and ends the process at once: the survivors of a dead peer cannot shut
    jax.distributed down cleanly (its atexit handler would block or abort)."""
    print(f"t5lite: error: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(code)
