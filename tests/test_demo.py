"""`python -m t5lite.demo --quick`: the demo's whole path (3 trainings, evaluation, report) on the tiny model."""

import json
import math
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_table_results_and_plots(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "t5lite.demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| pretrained |" in run.stdout and "| from scratch |" in run.stdout
    results = json.loads((out / "results.json").read_text())
    for label in ("pretrained", "from scratch"):
        row = results["evaluation"][label]
        assert row["num_examples"] == 32
        for key in ("chrf", "bleu", "perplexity"):
            assert math.isfinite(row[key]) and row[key] >= 0, (label, key, row[key])
    for stage in ("pretrain", "finetune", "scratch"):
        record = results["stages"][stage]
        assert math.isfinite(record["final_loss"]) and record["wall_s"] > 0
        assert os.path.isdir(out / stage / "checkpoints" / str(record["steps"]))
        assert os.listdir(out / stage / "tensorboard")
    assert results["stages"]["finetune"]["init"] == os.path.join(str(out), "pretrain")
    assert len(results["examples"]) == 3
    for png in ("loss_curves.png", "finetune_vs_scratch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pretrained |" in (out / "results.md").read_text()

    again = subprocess.run([sys.executable, "-m", "t5lite.demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)  # finished stages are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already trained") == 3
