"""Real multi-process runs (2 processes on 127.0.0.1, as launch/ starts them): the same global batches
and losses as one process, resume on another process count, agreed preemption, a dead peer."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "--gin.train.log_period=1",
       "--gin.train.progress='off'", "--gin.RANDOM_SEED=5"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(model_dir, *flags):
    return [sys.executable, "-m", "t5lite.cli", "train", *RUN, f"--model_dir={model_dir}", *flags]


# Cheaper XLA compilation; every run of a comparison uses the same flags.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _start(model_dir, *flags, processes=2, devices=1):
    """`processes` processes of one run, as launch/gpu_multihost.sh starts them, `devices` CPU devices each."""
    port = _port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}")
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(_command(model_dir, *flags), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=600):
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


def _losses(model_dir):
    out = {}
    for line in open(os.path.join(model_dir, "metrics.jsonl")):
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _steps(model_dir):
    path = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _close(a, b, rtol=1e-5):
    return abs(a - b) <= rtol * abs(b)


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_start(one, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=3", processes=1))
    _finish(_start(two, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3"))
    reference, losses = _losses(one), _losses(two)
    assert sorted(losses) == [1, 2, 3]
    for step in (1, 2, 3):  # the same data from the first step: one global order for any process count
        assert _close(losses[step], reference[step]), (step, losses[step], reference[step])
    # The 2-process checkpoint of step 3 continues on 1 process with the 1-process run's losses.
    _finish(_start(two, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=3", processes=1))
    losses = _losses(two)
    for step in (4, 5, 6):
        assert _close(losses[step], reference[step]), (step, losses[step], reference[step])


def _wait_for_steps(model_dir, procs, n, timeout=600):
    metrics, deadline = os.path.join(model_dir, "metrics.jsonl"), time.time() + timeout
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= n):
        for p in procs:
            assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline, "the run never reached its first steps"
        time.sleep(0.05)


def test_sigterm_to_one_process_saves_the_same_step_on_all_and_exits_zero(tmp_path):
    model_dir = tmp_path / "run"
    procs = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000")
    _wait_for_steps(model_dir, procs, 3)
    procs[1].send_signal(signal.SIGTERM)  # a preempted worker: only one process is told
    _finish(procs, timeout=300)  # both exit 0 (a disagreement would hang the collective save)
    steps = _steps(model_dir)
    assert len(steps) == 1 and 3 <= steps[0] < 100000
    assert max(_losses(model_dir)) == steps[0]  # stopped right after the agreed step


def test_a_dead_peer_ends_the_survivor_with_one_line_in_bounded_time(tmp_path):
    model_dir = tmp_path / "run"
    procs = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000",
                   "--gin.train.peer_timeout_s=20")
    _wait_for_steps(model_dir, procs, 3)
    procs[1].kill()
    start = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[0].kill()
    assert procs[0].returncode not in (0, None)
    assert time.time() - start < 20 + 60
    lines = err.strip().splitlines()
    assert lines[-1].startswith("t5lite: error: ") and "peer" in lines[-1], lines[-5:]
    shutil.rmtree(model_dir, ignore_errors=True)


def _keep_steps_up_to(model_dir, last):
    for step in _steps(model_dir):
        if step > last:
            shutil.rmtree(os.path.join(model_dir, "checkpoints", str(step)))


def test_a_checkpoint_resumes_on_another_mesh_with_the_same_losses(tmp_path):
    """8 simulated devices (8, 1, 1) -> 1 device, and 1 device -> (2, 2, 2): restored parameters and the
    data position carry over, so steps 3-4 repeat the uninterrupted 1-device run's losses."""
    reference = tmp_path / "reference"
    _finish(_start(reference, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", processes=1))
    for name, first, second in (("eight_to_one", ("--gin.train.mesh_shape=(8, 1, 1)", 8), ("", 1)),
                                ("one_to_2x2x2", ("", 1), ("--gin.train.mesh_shape=(2, 2, 2)", 8))):
        model_dir = tmp_path / name
        _finish(_start(model_dir, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", *filter(None, [first[0]]),
                       processes=1, devices=first[1]))
        _finish(_start(model_dir, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", *filter(None, [second[0]]),
                       processes=1, devices=second[1]))
        want, got = _losses(reference), _losses(model_dir)
        for step in (1, 2, 3, 4):
            assert _close(got[step], want[step]), (name, step, got[step], want[step])


def test_restoring_under_another_mesh_gives_identical_parameters(tmp_path):
    model_dir = tmp_path / "run"
    _finish(_start(model_dir, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", processes=1))
    digests = []
    for mesh, devices in (("1,1,1", 1), ("2,2,2", 8), ("1,8,1", 8)):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}")
        out = subprocess.run([sys.executable, __file__, "restore", str(model_dir), mesh], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1] == digests[2], digests


def _restore_and_digest(model_dir: str, mesh: str) -> None:
    """Restores model_dir's latest train state under `mesh` (data, fsdp, tensor) and prints a digest of it."""
    import hashlib

    import jax
    import numpy as np

    from t5lite.model import get_config
    from t5lite.train import partitioning
    from t5lite.train.checkpoint import TrainCheckpointer
    from t5lite.train.optimizers import make_optimizer

    config = get_config("tiny", vocab_size=8192)
    optimizer = make_optimizer("adafactor", "constant", 0.01, 100, total_steps=2)
    mesh = partitioning.make_mesh(*map(int, mesh.split(",")))
    rules = partitioning.rules_for(mesh)
    shardings = partitioning.state_shardings(config, optimizer, mesh, rules)

    class NoData:  # only the arrays are compared here
        def get_state(self):
            return {"num_shards": 8, "shards": {}, "ended": []}

        def set_state(self, state):
            pass

    checkpointer = TrainCheckpointer(model_dir)
    step, state, _ = checkpointer.restore_latest(partitioning.abstract_train_state(config, optimizer, shardings),
                                                 NoData(), config)
    checkpointer.close()
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    print(step, digest.hexdigest())


if __name__ == "__main__":
    _restore_and_digest(sys.argv[2], sys.argv[3])
