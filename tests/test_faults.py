"""Faults a user meets: resuming with other data settings, Ctrl-C, a failed save, a vanished model_dir,
out of memory, bad ranges. Each test is a case that once misbehaved (hung, lost checkpoints, printed a
traceback, or exited 0 having done the wrong thing)."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5lite.cli import main
from t5lite.data import pipeline as pl
from t5lite.errors import UserError
from t5lite.train import checkpoint, memory
from t5lite.train import run as run_lib
from t5lite.train import preemption as preemption_lib
from t5lite.train.checkpoint import read_meta
from t5lite.train.monitor import Monitor
from tests.test_safety import _one_line_error


@contextlib.contextmanager
def _deadline(seconds):
    """Fails (instead of hanging) when the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- The pipeline survives a restored position that does not fit its documents ----------------------


def test_concat_split_restored_past_the_end_of_a_shorter_document_moves_on():
    """Another seed restored into a span-corruption pipeline: the saved position skips more tokens than
    the document now read there has. It used to loop forever, growing memory until MemoryError."""
    long_docs = [{"targets": np.arange(3, 3 + n)} for n in (50, 7, 9)]
    short_docs = [{"targets": np.arange(100, 100 + n)} for n in (5, 7, 9)]
    it = iter(pl.ConcatSplitIterDataset(grain.MapDataset.source(long_docs).to_iter_dataset(), 8))
    for _ in range(4):  # 32 tokens into the 50-token document
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["skip"] == 32
    resumed = iter(pl.ConcatSplitIterDataset(grain.MapDataset.source(short_docs).to_iter_dataset(), 8))
    resumed.set_state(state)
    with _deadline(10):
        rest = np.concatenate([c["targets"] for c in resumed])
    # The 5-token first document counts as emitted; the stream goes on with the next ones, whole.
    np.testing.assert_array_equal(rest, np.concatenate([d["targets"] for d in short_docs[1:]]))


# --- Resume semantics: what the data position depends on is recorded and compared ------------------

QUICK = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "--gin.BATCH_SIZE=8",
         "--gin.train.log_period=2", "--gin.train.progress='off'"]


def _train(model_dir, *flags, steps=4, period=2):
    return main(["train", *QUICK, f"--model_dir={model_dir}", f"--gin.TRAIN_STEPS={steps}",
                 f"--gin.CHECKPOINT_PERIOD={period}", *flags])


def _snapshot(directory):
    """{relative path: sha256} of every file under `directory` (names of directories included)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), directory) + "/"] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _steps(model_dir):
    return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())


def _metric_steps(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny span-corruption run with checkpoints at steps 2 and 4."""
    model_dir = tmp_path_factory.mktemp("faults") / "run"
    assert _train(model_dir) == 0
    return model_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(trained, model_dir)
    return model_dir


def test_the_checkpoint_records_what_the_data_position_depends_on(run_copy):
    meta = read_meta(os.path.join(run_copy, "checkpoints", "4"))
    data = meta["data"]
    assert data["task"] == "bible_span_corruption_en_es" and data["batch_size"] == 8
    assert data["feature_lengths"] == {"inputs": 64, "targets": 14} and data["pack"] is True
    assert data["seed"] == 0 and data["data_shards"] == 8 and len(data["sources"]) == 16


def test_resuming_with_another_seed_is_one_line_and_touches_nothing(run_copy, capsys):
    """Used to hang after 'resumed at step 4' with memory growing to the whole host."""
    before = _snapshot(run_copy)
    with _deadline(120):
        _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=6",
                         "--gin.CHECKPOINT_PERIOD=2", "--gin.RANDOM_SEED=1"], capsys,
                        "RANDOM_SEED 0 -> 1", "train.reset_data=True", f"--init_checkpoint={run_copy}")
    assert _snapshot(run_copy) == before


def test_resuming_with_another_task_is_one_line_and_renames_nothing(run_copy, capsys):
    """Used to rename both good checkpoints *.unreadable (KeyError 'next_index') and restart at step 0."""
    before = _snapshot(run_copy)
    _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=6",
                     "--gin.MIXTURE_OR_TASK_NAME='bible_translate_en_es'"], capsys,
                    "MIXTURE_OR_TASK_NAME 'bible_span_corruption_en_es' -> 'bible_translate_en_es'",
                    "finetune")
    assert _snapshot(run_copy) == before


def test_a_checkpoint_without_a_record_still_resumes_and_refuses_another_task(run_copy, capsys):
    """Checkpoints written before the record: unknown settings are not a mismatch, but a data position
    that cannot be placed in this pipeline is a configuration error, never a damaged step."""
    for step in _steps(run_copy):
        path = os.path.join(run_copy, "checkpoints", str(step), "meta", "metadata")
        meta = json.load(open(path))
        del meta["data"]
        json.dump(meta, open(path, "w"))
    before = _snapshot(run_copy)
    _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=6",
                     "--gin.MIXTURE_OR_TASK_NAME='bible_translate_en_es'"], capsys,
                    "other data settings", "reset_data")
    assert _snapshot(run_copy) == before
    assert _train(run_copy, steps=6) == 0
    assert _steps(run_copy) == [4, 6]


def test_reset_data_keeps_the_step_and_starts_the_new_data(run_copy):
    assert _train(run_copy, "--gin.RANDOM_SEED=1", "--gin.train.reset_data=True", steps=6) == 0
    assert _steps(run_copy) == [4, 6]
    assert read_meta(os.path.join(run_copy, "checkpoints", "6"))["data"]["seed"] == 1
    # The next resume with the new seed needs no flag: the checkpoint records it.
    assert _train(run_copy, "--gin.RANDOM_SEED=1", steps=8) == 0
    assert _steps(run_copy) == [6, 8]


def test_a_permission_error_is_one_line_and_renames_nothing(run_copy, capsys, monkeypatch):
    """Used to rename the step .unreadable and train it again silently."""
    def denied(step_dir):
        raise PermissionError(13, "Permission denied", os.path.join(step_dir, "meta", "metadata"))
    monkeypatch.setattr(checkpoint, "read_meta", denied)
    before = _snapshot(run_copy)
    _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=6"], capsys,
                    "permission denied", os.path.join(str(run_copy), "checkpoints", "4", "meta", "metadata"))
    assert _snapshot(run_copy) == before


# --- Interrupts and I/O faults -------------------------------------------------------------------

def _cli(*args):
    return [sys.executable, "-m", "t5lite.cli", *args]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.getcwd(), **extra}


def _wait_for(predicate, seconds, proc):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"not reached in {seconds} s")


def test_ctrl_c_saves_the_current_step_and_exits_130_with_one_line(tmp_path):
    """Used to print a 75-line KeyboardInterrupt traceback and save nothing since the last checkpoint."""
    model_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=100000",
                                 "--gin.CHECKPOINT_PERIOD=100000", "--gin.train.log_period=1"),
                            env=_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    metrics = model_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, proc)
    proc.send_signal(signal.SIGINT)
    err = _finish(proc, 120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("t5lite: interrupted: Ctrl-C: training stopped, saved step "), last
    step = int(last.split("saved step ")[1].split()[0])
    assert step >= 2 and _steps(model_dir) == [step]


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption_lib, "fail", lambda message, code=1, label="error": exits.append((code, message)))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    preemption = preemption_lib.Preemption()
    try:
        preemption._handler(signal.SIGINT, None)
        assert preemption.signal == "SIGINT" and not exits  # the first one: save at the end of this step
        preemption._handler(signal.SIGINT, None)
        assert exits and exits[0][0] == 130 and "without saving" in exits[0][1]
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGINT) is before  # the handler the process had is back


def test_a_failed_save_stops_at_that_step_with_one_line_keeping_earlier_checkpoints(run_copy, capsys, monkeypatch):
    """Disk full during a save used to print 488 lines of orbax tracebacks and train two more steps."""
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, "6"))
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    line = _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=10",
                            "--gin.CHECKPOINT_PERIOD=2"], capsys,
                           "saving checkpoint step 6 to", "No space left on device", "GiB free of",
                           "earlier checkpoints are kept (2, 4)")
    assert str(run_copy) in line
    assert _steps(run_copy) == [2, 4]
    assert max(_metric_steps(run_copy)) == 6  # stopped at the failed step, not two steps later


def test_a_save_failing_in_the_background_stops_the_next_step(run_copy, capsys, monkeypatch, caplog):
    """orbax's finalising thread takes the error and only logs it (with a traceback): the run went on."""
    calls = []

    def check_for_errors(self):
        calls.append(1)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check_for_errors)
    _one_line_error(["train", *QUICK, f"--model_dir={run_copy}", "--gin.TRAIN_STEPS=10",
                     "--gin.CHECKPOINT_PERIOD=2"], capsys, "saving checkpoint step 6", "Disk quota exceeded")
    assert calls and max(_metric_steps(run_copy)) <= 8
    assert not [r for r in caplog.records if r.exc_info]  # orbax's message stays, its traceback goes


def test_model_dir_vanishing_mid_run_is_an_error(tmp_path, capsys, monkeypatch):
    """Used to exit 0 without a word."""
    model_dir = tmp_path / "run"
    real_log = Monitor.log

    def log_then_delete(self, step, *args, **kwargs):
        record = real_log(self, step, *args, **kwargs)
        if step == 2:
            shutil.rmtree(model_dir)
        return record
    monkeypatch.setattr(Monitor, "log", log_then_delete)
    _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=6",
                     "--gin.CHECKPOINT_PERIOD=2"], capsys, "vanished during the run", str(model_dir))
    assert not model_dir.exists()  # nothing re-created behind the user's back


def _finish(proc, seconds):
    """stderr of `proc` once it exits; killed (never left behind) when it does not within `seconds`."""
    try:
        return proc.communicate(timeout=seconds)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _waiting_for_peers(tmp_path, *flags):
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    return subprocess.Popen(_cli("train", *QUICK, f"--model_dir={tmp_path / 'run'}", "--gin.TRAIN_STEPS=4", *flags),
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_sigterm_while_waiting_for_peers_exits_with_one_line(tmp_path):
    """A run whose peer never started used to ignore SIGTERM and abort after 300 s with a C++ stack dump."""
    proc = _waiting_for_peers(tmp_path)
    lines = []

    def waiting():
        line = proc.stderr.readline()
        lines.append(line)
        return "waiting for the processes of this run to connect" in line
    _wait_for(waiting, 120, proc)
    time.sleep(1)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, 30)
    assert time.monotonic() - start < 10
    last = err.strip().splitlines()[-1]
    assert last.startswith("t5lite: interrupted: SIGTERM received while waiting"), err[-2000:]
    assert "Traceback" not in err and "Check failure" not in err


def test_peers_that_never_connect_end_the_wait_after_peer_timeout(tmp_path):
    proc = _waiting_for_peers(tmp_path, "--gin.train.peer_timeout_s=3")
    err = _finish(proc, 120)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "did not connect within 3 s" in last and "JAX_COORDINATOR_ADDRESS" in last, err[-2000:]
    assert "Traceback" not in err and "Check failure" not in err


# --- Range checks, found before any work ----------------------------------------------------------

def test_dropout_rate_out_of_range_is_one_line(tmp_path, capsys):
    """dropout_rate=1.5 used to train with gradient norm 0 at every step, exit 0."""
    for rate in ("1.5", "1.0", "-0.1"):
        _one_line_error(["train", *QUICK, f"--model_dir={tmp_path / 'run'}", f"--gin.T5Config.dropout_rate={rate}"],
                        capsys, "T5Config.dropout_rate must be in [0, 1)")
    assert not (tmp_path / "run").exists()


def test_model_dir_a_file_under_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    _one_line_error(["train", *QUICK, f"--model_dir={a_file}"], capsys, "is a file, not a directory")
    _one_line_error(["train", *QUICK, f"--model_dir={a_file / 'run'}"], capsys, "cannot be created", str(a_file))
    assert a_file.read_text() == "keep me"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(read_only)
                        else real_access(p, mode, **kw))  # as root, chmod alone does not stop writes
    _one_line_error(["train", *QUICK, f"--model_dir={read_only / 'run'}"], capsys, "is not writable", str(read_only))
    assert os.listdir(read_only) == []


def test_data_dir_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    from t5lite.data.corpora import tfds_builders
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("T5LITE_DATA_DIR", str(a_file))
    with pytest.raises(UserError, match="T5LITE_DATA_DIR.*is a file"):
        tfds_builders.prepare_shipped()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("T5LITE_DATA_DIR", str(empty))
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False)
    with pytest.raises(UserError, match="not writable; set T5LITE_DATA_DIR"):
        tfds_builders.prepare_shipped()


def test_distributed_on_one_host_is_one_line(tmp_path):
    env = _env(T5LITE_DISTRIBUTED="1")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    proc = subprocess.Popen(_cli("train", *QUICK, f"--model_dir={tmp_path / 'run'}"), env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    err = _finish(proc, 120)
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "T5LITE_DISTRIBUTED=1" in last and "unset that variable" in last, last
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --- Out of memory ----------------------------------------------------------------------------------

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 33285996544 bytes."


def test_out_of_memory_names_the_need_the_device_and_the_largest_batch_that_fits(monkeypatch):
    """XLA's memory analysis of the real compiled program decides which batch fits."""
    w = jnp.ones((512, 512), jnp.float32)
    step = jax.jit(lambda x: jnp.tanh(x @ w) @ w)

    def lower(batch):
        return step.lower(jax.ShapeDtypeStruct((batch, 512), jnp.float32))
    need = {b: memory.program_bytes(lower(b).compile()) for b in (24, 32)}
    assert need[24] < need[32]
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: need[24])
    line = memory.explain("train step", jax.errors.JaxRuntimeError(OOM), lower=lower, batch_size=64, unit=8)
    assert line.startswith("out of memory in the train step: it needs ")
    assert "and the host has" in line and "BATCH_SIZE 24 fits" in line, line
    for knob in ("BATCH_SIZE", "TASK_FEATURE_LENGTHS", "train.num_microbatches", "remat_policy"):
        assert knob in line
    assert memory.is_out_of_memory(MemoryError()) and not memory.is_out_of_memory(ValueError("shapes"))


def test_out_of_memory_in_training_is_one_line(tmp_path, capsys, monkeypatch):
    """BATCH_SIZE=2048 on the demo model used to end in a 43-line traceback asking for 31 GB."""
    real = run_lib.make_train_step

    class OutOfMemory:
        def __init__(self, jitted):
            self.jitted = jitted

        def __call__(self, *args):
            raise jax.errors.JaxRuntimeError(OOM)

        def lower(self, *args):
            return self.jitted.lower(*args)
    monkeypatch.setattr(run_lib, "make_train_step", lambda *a, **k: OutOfMemory(real(*a, **k)))
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 2**30)
    line = _one_line_error(["train", *QUICK, f"--model_dir={tmp_path / 'run'}", "--gin.TRAIN_STEPS=2"], capsys,
                           "out of memory in the train step: it needs ", "the host has 1 GiB available",
                           "lower BATCH_SIZE")
    assert "Traceback" not in line


def test_reading_a_checkpoint_for_inference_or_fine_tuning_names_a_permission_error(run_copy, monkeypatch):
    def denied(step_dir):
        raise PermissionError(13, "Permission denied", os.path.join(step_dir, "meta", "metadata"))
    monkeypatch.setattr(checkpoint, "read_meta", denied)
    for read in (checkpoint.load_train_checkpoint_params, checkpoint.stored_model):
        with pytest.raises(UserError, match="permission denied on .*/checkpoints/4/meta/metadata"):
            read(str(run_copy))
    assert _steps(run_copy) == [2, 4]


def test_host_memory_available_respects_the_process_limit():
    """Under `ulimit -v` the host's free memory is not what the process may use (a real OOM at BATCH_SIZE
    2048 on the demo model under a 7 GB limit suggested a batch sized for the whole host)."""
    code = "from t5lite.train import memory; print(memory.device_memory_bytes())"
    out = subprocess.run(["bash", "-c", f"ulimit -v 6000000; {sys.executable} -c '{code}'"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0 < int(out.stdout.split()[-1]) < 6000000 * 1024
