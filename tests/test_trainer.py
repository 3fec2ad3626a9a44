"""The training loop: bit-exact resume after SIGKILL, SIGTERM checkpoints, corrupt checkpoints, NaN stop, learning."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.train.checkpoint import TrainCheckpointer, load_train_checkpoint_params

RUN = dict(task="bible_span_corruption_en_es", batch_size=8, feature_lengths={"inputs": 64, "targets": 14},
           model="tiny", model_overrides={"vocab_size": 8192}, schedule="constant", learning_rate=0.01,
           warmup_steps=5, log_period=1, progress="off", seed=3)


def _script(tmp_path, model_dir, **overrides):
    kwargs = dict(RUN, model_dir=str(model_dir), **overrides)
    path = tmp_path / f"train_{abs(hash(str(sorted(kwargs.items())))) % 10**8}.py"
    path.write_text(textwrap.dedent(f"""
        from t5lite.train.trainer import TrainConfig, train
        train(TrainConfig(**{kwargs!r}))
    """))
    return [sys.executable, str(path)]


def _losses(model_dir):
    """step -> loss, the last line for a step winning (a killed run may have logged past its checkpoint)."""
    out = {}
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record["loss"]
    return out


def _kill_when(cmd, ready, sig=signal.SIGKILL, timeout=300):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(0.005)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def _steps(model_dir):
    path = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _assert_same_run(reference_dir, resumed_dir, from_step):
    ref_cfg, ref_params, _ = load_train_checkpoint_params(reference_dir)
    cfg, params, _ = load_train_checkpoint_params(resumed_dir)
    assert _steps(resumed_dir)[-1] == 20 and cfg == ref_cfg
    flat = lambda p: {k: np.asarray(v) for k, v in _flat(p)}  # noqa: E731
    ref, ours = flat(ref_params), flat(params)
    assert ref.keys() == ours.keys()
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    ref_losses, losses = _losses(reference_dir), _losses(resumed_dir)
    for step in range(from_step + 1, 21):
        assert losses[step] == ref_losses[step], (step, losses[step], ref_losses[step])


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """20 uninterrupted steps, checkpoints every 5."""
    tmp = tmp_path_factory.mktemp("reference")
    subprocess.run(_script(tmp, tmp / "run", train_steps=20, checkpoint_period=5), check=True, timeout=600)
    return tmp / "run"


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(reference_run, tmp_path):
    model_dir = tmp_path / "run"
    cmd = _script(tmp_path, model_dir, train_steps=20, checkpoint_period=5)
    _kill_when(cmd, lambda: 10 in _steps(model_dir))
    killed_at = _steps(model_dir)[-1]
    assert 10 <= killed_at < 20
    subprocess.run(cmd, check=True, timeout=600)
    _assert_same_run(reference_run, model_dir, killed_at)


@pytest.mark.slow
def test_resume_after_sigkill_during_saves_is_bit_exact(reference_run, tmp_path):
    """Checkpoints every step, so the kill lands in or right around an (async) save."""
    model_dir = tmp_path / "run"
    cmd = _script(tmp_path, model_dir, train_steps=20, checkpoint_period=1, keep_checkpoints=3)
    _kill_when(cmd, lambda: any(s >= 8 for s in _steps(model_dir)))
    resumed_from = _steps(model_dir)[-1]
    subprocess.run(cmd, check=True, timeout=600)
    _assert_same_run(reference_run, model_dir, resumed_from)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    model_dir = tmp_path / "run"
    cmd = _script(tmp_path, model_dir, train_steps=100_000, checkpoint_period=10_000)
    metrics = model_dir / "metrics.jsonl"
    code = _kill_when(cmd, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, signal.SIGTERM)
    assert code == 0
    steps = _steps(model_dir)
    assert len(steps) == 1 and 3 <= steps[0] < 10_000  # saved because of SIGTERM, not the period
    assert max(_losses(model_dir)) <= steps[0]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, caplog):
    from t5lite.data import tasks
    from t5lite.model import get_config
    from t5lite.train import partitioning
    from t5lite.train.optimizers import make_optimizer

    model_dir = tmp_path / "run"
    shutil.copytree(reference_run, model_dir)
    state_dir = model_dir / "checkpoints" / "20" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    config = get_config("tiny", vocab_size=8192)
    opt = make_optimizer("adafactor", "constant", 0.01, 5, total_steps=20)
    mesh = partitioning.make_mesh()
    shardings = partitioning.state_shardings(config, opt, mesh, partitioning.rules_for(mesh))
    data = tasks.get(RUN["task"]).pipeline("train", feature_lengths=RUN["feature_lengths"], batch_size=8, seed=3)
    checkpointer = TrainCheckpointer(str(model_dir))
    with caplog.at_level(logging.WARNING):
        step, state, meta = checkpointer.restore_latest(
            partitioning.abstract_train_state(config, opt, shardings), data)
    checkpointer.close()
    assert step == 15 and int(state.step) == 15 and meta["format"] == "t5lite-train"
    assert any("step 20" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from t5lite.train.trainer import TrainConfig, train
    with pytest.raises(UserError, match=r"loss is (nan|inf) at step \d+: training stopped \(the last good"):
        train(TrainConfig(**dict(RUN, model_dir=str(tmp_path / "run"), train_steps=60, checkpoint_period=1,
                                 optimizer="adamw", learning_rate=1e12, warmup_steps=0)))
    losses = _losses(tmp_path / "run")  # NaN is written as null
    bad_step = min(s for s, loss in losses.items() if loss is None)
    steps = _steps(tmp_path / "run")
    assert steps and max(steps) == bad_step - 1, (steps, bad_step)


@pytest.mark.slow
def test_tiny_model_learns_span_corruption(tmp_path):
    from t5lite.train.trainer import TrainConfig, train
    train(TrainConfig(**dict(RUN, model_dir=str(tmp_path / "run"), train_steps=200, checkpoint_period=1000,
                             log_period=10, learning_rate=0.01)))
    losses = _losses(tmp_path / "run")
    first, last = losses[10], np.mean([losses[s] for s in (180, 190, 200)])
    assert last < 0.7 * first, (first, last)


@pytest.mark.slow
def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    """SIGTERM once the run holds model_dir (validated, compiling): exit 0, at most the first step saved."""
    model_dir = tmp_path / "run"
    cmd = _script(tmp_path, model_dir, train_steps=100_000, checkpoint_period=10_000)
    code = _kill_when(cmd, lambda: (model_dir / ".t5lite.lock").exists(), signal.SIGTERM)
    assert code == 0
    assert set(_steps(model_dir)) <= {1}
