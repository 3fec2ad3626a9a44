"""A study trained for real at toy size: the LoRA study's shared base, a full fine-tuning and a LoRA card from it,
both scored with `t5lite eval`, then the results page; a re-run trains nothing and rebuilds the page."""

import json
import os
import re
import sys

import pytest

from t5lite.cli import main
from t5lite.scaling import summary

pytestmark = pytest.mark.slow  # three training subprocesses and two decoding ones (jax start-up and compilation)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--grid", "method=[full, lora_r4]", "--seeds", "1", "--gin.TRAIN_STEPS=2", "--gin.train.warmup_steps=1",
       "--gin.BATCH_SIZE=2", "--gin.train.eval_batches=1", "--gin.train.progress='off'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--eval_examples", "2"]


@pytest.fixture
def subprocess_env(monkeypatch):
    """The subprocesses import this checkout."""
    monkeypatch.setenv("PYTHONPATH", REPO)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def test_lora_study_trains_one_base_two_fine_tunings_scores_them_and_writes_the_page(tmp_path, capsys,
                                                                                       subprocess_env):
    root, page = str(tmp_path / "root"), str(tmp_path / "lora.md")
    args = ["sweep", "run", "experiments/studies/lora.toml", f"--root={root}", f"--results={page}", *TOY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("training (2 steps") == 3  # the base once, then each fine-tuning
    base = os.path.join(root, "pretrain", "seed-0")
    assert os.path.isdir(os.path.join(base, "checkpoints", "2"))
    rows = {r["method"]: r for r in summary.read_rows(root)}
    for method, row in rows.items():
        assert row["status"] == "done" and row["model_dir"] == os.path.join(root, "finetune", f"method-{method}_seed-0")
        with open(os.path.join(row["model_dir"], "config.gin")) as f:  # gin wraps long lines: join them
            assert f"INITIAL_CHECKPOINT_PATH = '{base}'" in re.sub(r"\\\n\s*", "", f.read())  # the shared base
        with open(os.path.join(row["model_dir"], "score.json")) as f:
            chrf = json.load(f)["bible_modernize_kjv_web"]["chrf"]
        assert row["score"] == chrf and 0 <= chrf <= 100
        assert row["flops_total"] > row["flops"]  # the base's FLOPs count too
    assert os.path.isfile(os.path.join(rows["lora_r4"]["model_dir"], "card", "card.json"))
    assert rows["lora_r4"]["params_trainable"] < rows["full"]["params_trainable"] / 10
    with open(page) as f:
        text = f.read()
    for method, row in rows.items():  # the over-seeds table: one seed, the score as eval gave it
        assert re.search(rf"^\| method={method} \| 1 \| {re.escape(summary.fmt(row['score']))} \|", text, re.M)
    assert "- Command: `t5lite sweep run experiments/studies/lora.toml" in text

    os.remove(page)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "training (" not in out and out.count("already trained") == 3
    assert os.path.isfile(page)
