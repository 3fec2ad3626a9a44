"""Preemption (SIGTERM: save, then exit 0; Ctrl-C: save, then exit 130), the wait for peers at
start-up, and dead-peer detection for multi-process runs.

One process: a Python SIGTERM / SIGINT handler sets a flag; the loop saves at the next step and stops.
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

from t5lite.errors import UserError

log = logging.getLogger(__name__)


class Preemption:
    """Install at the start of a run; `requested_before_start()` after set-up, `reached(n)` each step.

    SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C at a terminal) both save the current step
    and stop; `signal` says which came (the CLI exits 0 after SIGTERM, 130 after SIGINT). A second
    Ctrl-C exits at once with one line: the last complete checkpoint stays as it was."""

    def __init__(self):
        self._flag = False
        self.signal: Optional[str] = None  # 'SIGTERM' or 'SIGINT', the first one received
        self.saved_step: Optional[int] = None  # the step saved on the way out
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handler
                pass

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self._flag:
            if signum == signal.SIGINT:
                fail("interrupted again (Ctrl-C): exited at once without saving; the last complete checkpoint "
                     "is kept, run the same command to resume from it", code=130)
            return
        self._flag, self.signal = True, name
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting%s", name,
                    " (Ctrl-C again exits at once)" if signum == signal.SIGINT else "")
        if signum == signal.SIGINT and self._synchronised():
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's sync manager agrees on the step with every process

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
        synchronised = self._synchronised()
        for signum, previous in self._previous.items():
            if previous is None or (signum == signal.SIGTERM and synchronised):
                continue
            try:
                signal.signal(signum, previous)
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

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            if self._last is not None and time.monotonic() - self._last > self.timeout_s:
                fail(f"no training step finished for {self.timeout_s:.0f} s after step {self._step}: a peer "
                     "process has probably died or hung; restart the job (it resumes from the last checkpoint)")

    def close(self) -> None:
        self._stop.set()


def start_distributed(preemption: Preemption, timeout_s: Optional[float], poll_s: float = 0.2) -> None:
    """partitioning.maybe_initialize_distributed, waiting for the peers in a thread: jax's wait blocks in
    C++, where no Python signal handler runs, and ends in an abort with a C++ stack dump. The main thread
    stays in Python, so SIGTERM / Ctrl-C end the wait with one line, and so does `timeout_s` (the
    run's peer_timeout_s; jax's own timeout is set a minute later so that it never fires first)."""
    from t5lite.train import partitioning
    if not partitioning.wants_distributed():
        return
    kwargs = {"initialization_timeout": int(timeout_s) + 60} if timeout_s else {}
    outcome = {}

    def initialize():
        try:
            partitioning.maybe_initialize_distributed(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=initialize, name="t5lite-distributed-init", daemon=True)
    start = time.monotonic()
    thread.start()
    log.info("waiting for the processes of this run to connect (up to %s)",
             f"{timeout_s:.0f} s" if timeout_s else "jax's default timeout")
    while thread.is_alive():
        thread.join(poll_s)
        waited = time.monotonic() - start
        if preemption.signal and thread.is_alive():
            fail(f"{preemption.signal} received while waiting {waited:.0f} s for the other processes of this run "
                 "to connect: nothing trained, nothing saved", code=130 if preemption.signal == "SIGINT" else 0,
                 label="interrupted")
        if timeout_s and waited > timeout_s and thread.is_alive():
            fail(f"the other processes of this run did not connect within {timeout_s:.0f} s (train.peer_timeout_s): "
                 "check that every process started with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, "
                 "and that the coordinator's port is reachable")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, UserError):
            raise error
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserError(f"connecting the processes of this run failed ({type(error).__name__}: {text}); check "
                        "the coordinator address and that every process started") from None


def fail(message: str, code: int = 1, label: str = "error") -> None:
    """Prints one line and ends the process at once: the survivors of a dead peer cannot shut
    jax.distributed down cleanly (its atexit handler would block or abort)."""
    print(f"t5lite: {label}: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(code)
