"""`t5lite sweep run` end to end: real training subprocesses of the tiny model for a few steps."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from t5lite.cli import main
from t5lite.scaling import summary

pytestmark = pytest.mark.slow  # every point is a training subprocess (jax start-up and compilation)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.progress='off'",
        "--gin.BATCH_SIZE=4"]
GRID = ["--grid", "T5Config.emb_dim=[32, 48]", "--grid", "TRAIN_STEPS=[2, 3]"]


def _env():
    """The subprocesses import this checkout and find the `t5lite` script of this interpreter."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def subprocess_env(monkeypatch):
    for key, value in _env().items():
        monkeypatch.setenv(key, value)


def test_two_by_two_grid_printed_line_runs_then_rerun_does_no_work(tmp_path, capsys, subprocess_env):
    root = str(tmp_path / "sweep")
    args = ["sweep", "run", *SPEC, *GRID, f"--root={root}"]
    assert main([*args, "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(shlex.split(line)[:2] == ["t5lite", "train"] for line in lines)
    assert not os.path.exists(root)  # printing commands writes nothing

    # A printed line runs as is (as it would on another machine); the sweep then finds that point done.
    first = os.path.join(root, "emb_dim-32_TRAIN_STEPS-2_seed-0")
    done = subprocess.run(["bash", "-c", lines[0]], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isdir(os.path.join(first, "checkpoints", "2"))

    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 1 and out.count("done in") == 3
    assert not os.path.exists(os.path.join(first, "train.log"))  # the sweep did not train it again
    rows = summary.read_rows(root)
    assert [r["name"] for r in rows] == ["emb_dim-32_TRAIN_STEPS-2_seed-0", "emb_dim-32_TRAIN_STEPS-3_seed-0",
                                         "emb_dim-48_TRAIN_STEPS-2_seed-0", "emb_dim-48_TRAIN_STEPS-3_seed-0"]
    for r in rows:
        steps = int(r["TRAIN_STEPS"])
        assert r["status"] == "done" and r["step"] == steps and r["error"] is None
        assert r["train_loss"] > 0 and r["eval_loss"] > 0 and 0 <= r["eval_accuracy"] <= 1
        assert r["tokens"] == steps * 4 * (32 + 8) and r["target_tokens"] == steps * 4 * 8
        assert r["flops"] > 0 and r["params"] > r["params_non_embedding"] > 0
    assert rows[2]["params_non_embedding"] > rows[0]["params_non_embedding"]
    for name in ("summary.csv", "summary.md", "groups.jsonl", "sweep.json"):
        assert os.path.isfile(os.path.join(root, name))
    with open(os.path.join(rows[1]["model_dir"], "sweep_status.json")) as f:
        assert json.load(f)["wall_s"] > 0
    assert rows[0]["wall_s"] is None  # trained from its printed line, not by the sweep

    logs = {r["name"]: os.path.getmtime(os.path.join(r["model_dir"], "metrics.jsonl")) for r in rows}
    assert main(args) == 0
    assert capsys.readouterr().out.count("already trained") == 4
    assert logs == {r["name"]: os.path.getmtime(os.path.join(r["model_dir"], "metrics.jsonl")) for r in rows}


def test_a_failing_point_is_recorded_with_its_error_and_the_others_finish(tmp_path, capsys, subprocess_env):
    root = str(tmp_path / "sweep")
    # A vocabulary that does not exist passes planning (which reads no files) and fails inside the training
    # subprocess; settings train would refuse are caught when planning (test_sweep.py).
    assert main(["sweep", "run", *SPEC, "--grid", "train.vocab_path=['/nonexistent/spiece.model', None]",
                 "--gin.TRAIN_STEPS=2", f"--root={root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 points did not finish" in err[0]
    failed, ok = summary.read_rows(root)
    assert failed["status"] == "failed" and failed["error"].startswith(
        "vocabulary file /nonexistent/spiece.model does not exist")
    assert ok["status"] == "done" and ok["eval_loss"] > 0
    with open(os.path.join(root, "summary.md")) as f:
        assert "/nonexistent/spiece.model does not exist" in f.read()
