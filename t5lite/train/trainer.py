"""The training loop: validate, lock, init or restore, train, evaluate, log, checkpoint, survive preemption.

`train(config)` is the one entry point: `config` is a TrainConfig (t5lite/train/config.py; gin
binds it as `train.*`, see t5lite/gin_utils.py). It runs in three phases:

1. Run.build(config) (t5lite/train/run.py): the task's splits, the first batches, the initial
   checkpoint and the vocabulary are checked, and the model, mesh, steps and data are built.
   A mistake is a UserError here, before anything is written into model_dir.
2. lock model_dir, then restore the newest readable checkpoint (one that holds another model, or
   was saved with other data settings, is a UserError, and nothing is touched) or initialise, and
   write the run's config files.
3. the loop. A run killed at any moment resumes from the newest complete checkpoint to exactly
   the losses and parameters it would have had: the state, the data position and the
   step-derived dropout keys are all restored. SIGTERM saves an agreed step on every process
   and exits 0, Ctrl-C saves too and exits 130; a dead peer ends the survivors with one line
   (t5lite/train/preemption.py). A failed save, a vanished model_dir or an out-of-memory step
   stop the run with one line.
"""

import contextlib
import logging
import math
import os
import time
from typing import Callable, Dict, Optional

import jax

from t5lite.errors import Interrupted, UserError
from t5lite.train import memory
from t5lite.train.checkpoint import TrainCheckpointer
from t5lite.train.config import TrainConfig
from t5lite.train.lock import ModelDirLock
from t5lite.train.preemption import Preemption, Watchdog, fail, start_distributed
from t5lite.train.run import Run

log = logging.getLogger(__name__)


def _host_metrics(metrics: Dict) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(metrics: Dict[str, float], step: int, last_saved: Optional[int]) -> None:
    if not math.isfinite(metrics["loss"]):
        kept = f"the last good checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was kept"
        raise UserError(f"loss is {metrics['loss']} at step {step}: training stopped ({kept}); lower the "
                        "learning rate, add warmup or gradient clipping, or check the data")


def train(config: TrainConfig, *, operative_gin: str = "",
          write_configs: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Trains as `config` says; returns the last logged metrics.

    Resumes automatically from `config.model_dir/checkpoints` (a resume whose data settings changed is
    refused unless `config.reset_data`). `write_configs(model_dir)` is called once the run holds
    model_dir (the CLI writes config.gin / operative_config.gin there); `operative_gin` is recorded
    in every checkpoint.
    """
    preemption = Preemption()  # first: SIGTERM during start-up also exits cleanly
    try:
        start_distributed(preemption, config.peer_timeout_s)
        run = Run.build(config)
        with _lock(config.model_dir), _orbax_errors_in_one_line():
            metrics = _train(run, preemption, operative_gin, write_configs)
    finally:
        preemption.uninstall()
    if preemption.signal == "SIGINT":
        saved = (f"saved step {preemption.saved_step} in {config.model_dir}; run the same command to resume"
                 if preemption.saved_step is not None else "nothing trained, nothing new saved")
        raise Interrupted(f"Ctrl-C: training stopped, {saved}")
    return metrics


class _NoTraceback(logging.Filter):
    """orbax logs a failed background save with its traceback, then t5lite reports it in one line
    (TrainCheckpointer.check): keep orbax's message, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in (record.pathname or ""):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@contextlib.contextmanager
def _orbax_errors_in_one_line():
    absl_logger, no_traceback = logging.getLogger("absl"), _NoTraceback()
    absl_logger.addFilter(no_traceback)
    try:
        yield
    finally:
        absl_logger.removeFilter(no_traceback)


def _lock(model_dir: str):
    """The model_dir lock, held by process 0 for the whole job; every process learns whether it got it."""
    lock = ModelDirLock(model_dir)
    if jax.process_count() == 1:
        return lock
    return _MultiProcessLock(lock)


class _MultiProcessLock:
    def __init__(self, lock: ModelDirLock):
        self._lock, self._held = lock, False

    def __enter__(self):
        import numpy as np
        from jax.experimental import multihost_utils
        error = None
        if jax.process_index() == 0:
            try:
                self._lock.__enter__()
                self._held = True
            except UserError as e:
                error = e
        if not bool(multihost_utils.broadcast_one_to_all(np.array(self._held))):
            raise error or UserError(f"model_dir {self._lock.model_dir} is in use by another run (see process 0's "
                                     "error); wait for it or stop it, or choose another --model_dir")
        return self

    def __exit__(self, *exc):
        if self._held:
            self._lock.__exit__(*exc)


def _train(run: Run, preemption: Preemption, operative_gin: str,
           write_configs: Optional[Callable[[str], None]]) -> Dict[str, float]:
    settings = run.train
    checkpointer = TrainCheckpointer(settings.model_dir, max_to_keep=settings.keep_checkpoints,
                                     keep_period=settings.keep_period, async_save=settings.async_checkpoints)
    monitor = watchdog = None
    try:
        restored = checkpointer.restore_latest(run.abstract_state, run.data, run.config, run.data_settings,
                                               settings.reset_data)
        if restored is not None:
            start_step, state, _ = restored
            log.info("resumed from %s at step %d", checkpointer.directory, start_step)
        else:
            start_step, state = 0, run.initial_state()
        if write_configs is not None and jax.process_index() == 0:
            write_configs(settings.model_dir)
        meta = run.checkpoint_meta(operative_gin)
        if start_step >= settings.train_steps:
            log.info("%s is already at step %d >= train_steps %d: nothing to train", settings.model_dir, start_step,
                     settings.train_steps)
            return {}
        if preemption.requested_before_start():
            log.warning("%s during start-up: exiting before the first step (nothing new to save)",
                        preemption.signal or "a signal to another process")
            return {}
        monitor = run.monitor(start_step)
        watchdog = Watchdog(settings.peer_timeout_s if jax.process_count() > 1 else None)
        progress = {"step": start_step}
        with _peer_failure_in_one_line(progress):
            metrics = _steps(run, state, start_step, checkpointer, monitor, watchdog, preemption, meta, progress)
        checkpointer.wait()  # the last save's failure is this run's error
        return metrics
    except BaseException:
        try:  # the first error is the one to report: a save still in flight must not replace it
            checkpointer.wait()
        except Exception as e:  # noqa: BLE001
            log.warning("the checkpoint save in progress failed too: %s", str(e).splitlines()[0][:300])
        raise
    finally:
        checkpointer.close()
        run.data.close()  # stops its prefetch thread now, not at interpreter exit
        if monitor is not None:
            monitor.close()
        if watchdog is not None:
            watchdog.close()


@contextlib.contextmanager
def _peer_failure_in_one_line(progress: Dict[str, int]):
    """In a multi-process run, an error out of the step loop (a dead peer surfaces anywhere) becomes one line
    naming the last finished step; `progress["step"]` is kept current by the loop."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        if jax.process_count() == 1:
            raise
        # Collectives are asynchronous: a dead peer surfaces anywhere in the loop (a metric read, a save).
        log.exception("training failed after step %d", progress["step"])
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        fail(f"training failed after step {progress['step']} of a {jax.process_count()}-process run "
             f"({type(e).__name__}: {text}); a peer process has probably died: restart the job (it resumes from "
             "the last checkpoint)")


def _steps(run, state, start_step, checkpointer, monitor, watchdog, preemption, meta, progress) -> Dict[str, float]:
    last_saved = start_step if start_step > 0 else None
    logged: Dict[str, float] = {}
    step, since, timer = start_step, 0, time.perf_counter()
    stop = False
    settings = run.train
    while step < settings.train_steps and not stop:
        _check_model_dir(settings.model_dir, step)
        checkpointer.check()  # a background save that failed stops the run now, not steps later
        batch = run.next_batch()
        with _out_of_memory(run, "train step", batch):
            state, metrics = run.train_step(state, batch)
            if step == start_step:  # keep compilation out of the throughput numbers
                jax.block_until_ready(metrics)
        step, since = step + 1, since + 1
        progress["step"] = step
        if step == start_step + 1:
            log.info("compiled and ran the first step in %.1f s", time.perf_counter() - timer)
            since, timer = 0, time.perf_counter()
        stop = preemption.reached(step - start_step)
        watchdog.beat(step)
        if step % settings.log_period == 0 or step == settings.train_steps:
            with _out_of_memory(run, "train step", batch):  # a run-time failure surfaces when metrics are read
                host = _host_metrics(metrics)
            logged = monitor.log(step, host, since, time.perf_counter() - timer)
            _check_finite(host, step, last_saved)
            since, timer = 0, time.perf_counter()
        if settings.eval_period and (step % settings.eval_period == 0 or step == settings.train_steps):
            with _out_of_memory(run, "eval step"):
                evaluated = run.evaluate(state.params)
            monitor.log_eval(step, evaluated)
            timer = time.perf_counter()
            watchdog.beat(step)
        if step % settings.checkpoint_period == 0 or step == settings.train_steps or stop:
            _check_finite(_host_metrics(metrics), step, last_saved)
            _check_model_dir(settings.model_dir, step)
            checkpointer.save(step, state, run.data, meta)
            run.saved(step, state, meta["gin"])
            last_saved = step
    if stop:
        preemption.saved_step = step
        log.warning("%s: saved step %d, exiting", preemption.signal or "preempted", step)
    return logged


@contextlib.contextmanager
def _out_of_memory(run, program: str, batch: Optional[dict] = None):
    """An out-of-memory error of `program` becomes one line: what it needs, what there is, what to lower,
    and (measured by compiling the train step for smaller batches) the largest BATCH_SIZE that fits."""
    try:
        yield
    except Exception as e:
        if not memory.is_out_of_memory(e):
            raise
        lower = None
        if batch is not None and hasattr(run.train_step, "lower"):
            def lower(size):
                abstract = {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype, sharding=v.sharding)
                            for k, v in batch.items()}
                return run.train_step.lower(run.abstract_state, abstract)
        raise UserError(memory.explain(program, e, lower=lower, batch_size=run.train.batch_size,
                                       unit=run.batch_unit())) from None


def _check_model_dir(model_dir: str, step: int) -> None:
    """model_dir deleted or moved away mid-run: stop, rather than write checkpoints nowhere (or into a
    new empty directory that orbax would create) and exit 0. Process 0 looks: it is the one that writes
    model_dir (other hosts may not share its disk)."""
    if jax.process_index() == 0 and not os.path.isdir(os.path.join(model_dir, "checkpoints")):
        raise UserError(f"model_dir {os.path.abspath(model_dir)} (or its checkpoints/) vanished during the run, "
                        f"after step {step}: training stopped; restore it, or start again with another --model_dir")


__all__ = ["train", "TrainConfig"]
