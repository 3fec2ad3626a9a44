"""The demo (t5lite.demos.demo, t5lite.demos.curve) and its fine-tuning subset (tasks.train_subset_task).

Fast tests: the subset (deterministic for a seed, nested across sizes, disjoint from validation and
test), the learning-rate choice (validation only), the summary arithmetic and the step rule of the
curve. The slow test runs every stage at toy size (tiny model, a few steps).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from t5lite.demos import curve as demo_curve
from t5lite.demos import demo
from t5lite.data import tasks
from t5lite.errors import UserError


def _ids(source, positions=None):
    return [source[i]["id"] for i in (range(len(source)) if positions is None else positions)]


def test_train_subset_is_deterministic_nested_and_disjoint_from_validation_and_test():
    a = tasks.train_subset_task(size=300, seed=7, name="subset_a")
    again = tasks.train_subset_task(size=300, seed=7, name="subset_again")
    other = tasks.train_subset_task(size=300, seed=8, name="subset_other")
    larger = tasks.train_subset_task(size=900, seed=7, name="subset_larger")
    ids = _ids(a.source("train"))
    assert len(ids) == len(set(ids)) == 300 == a.num_examples("train")
    assert ids == _ids(again.source("train"))                # same seed, same verses, same order
    assert set(ids) != set(_ids(other.source("train")))      # another seed draws others
    assert set(ids) < set(_ids(larger.source("train")))      # a smaller subset lies inside a larger one
    held_out = set(_ids(a.source("validation"))) | set(_ids(a.source("test")))
    assert held_out and not held_out & set(_ids(larger.source("train")))
    base = tasks.get("bible_translate_en_es")
    assert a.num_examples("validation") == base.num_examples("validation")  # its own held-out splits
    assert a.source("train").__getitems__([0, 5]) == [a.source("train")[0], a.source("train")[5]]
    assert tasks.get("subset_a") is a and "300 of the" in a.description


def test_train_subset_errors_name_the_fix():
    total = tasks.get("bible_translate_en_es").num_examples("train")
    for size in (0, total + 1, 2.5, True):
        with pytest.raises(UserError, match=r"size .* must be an integer in \[1, "):
            tasks.train_subset_task(size=size)
    with pytest.raises(UserError, match="seed"):
        tasks.train_subset_task(seed=-1)
    with pytest.raises(UserError, match="not a mixture"):
        tasks.train_subset_task(task="bible_en_es_mix")
    with pytest.raises(UserError, match="cannot be sliced"):
        tasks.train_subset_task(size=10).source("train[:5]")
    assert tasks.train_subset_task(size=None).num_examples("train") == total  # None: every pair


@pytest.mark.parametrize("argv", [["--train_size", "0"], ["--curve_sizes", "500,-1"], ["--learning_rates", "0"]])
def test_bad_sizes_and_rates_stop_before_any_training(argv, capsys):
    """Failed before the fix: --train_size 0 pre-trained for minutes, then stopped with gin's two-line error."""
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error: --" in capsys.readouterr().err


def test_the_learning_rate_is_chosen_on_validation_and_only_the_choice_sees_test(monkeypatch, tmp_path):
    val_chrf = {0.001: 20.0, 0.003: 31.0, 0.01: 31.0}  # a tie: the first (0.003) is kept
    test_chrf = {0.001: 99.0, 0.003: 25.0, 0.01: 50.0}  # test would pick 0.001: it must not be asked
    calls = []

    def fake_stage(name, gin_file, bindings, out, quick):
        lr = float(next(b for b in bindings if b.startswith("train.learning_rate=")).split("=")[1])
        assert "train_subset_task.size=500" in bindings and "RANDOM_SEED=3" in bindings
        assert any(b.startswith("INITIAL_CHECKPOINT_PATH=") for b in bindings) == (gin_file == demo.ARMS[0][1])
        return {"stage": name, "model_dir": str(lr), "steps": 5, "wall_s": 1.0}

    def fake_evaluate(model_dir, split, max_examples, args):
        calls.append((float(model_dir), split))
        chrf = (val_chrf if split == "validation" else test_chrf)[float(model_dir)]
        return {"results": {"chrf": chrf, "num_examples": max_examples}, "records": [], "wall_s": 0.5}

    monkeypatch.setattr(demo, "run_stage", fake_stage)
    monkeypatch.setattr(demo, "evaluate", fake_evaluate)
    args = demo.parse_args(["--out", str(tmp_path), "--learning_rates", "0.001,0.003,0.01"])
    for label, _, _ in demo.ARMS:
        calls.clear()
        result = demo.tune_and_test(500, label, 3, args, args.learning_rates)
        assert result["learning_rate"] == 0.003 and result["test"]["chrf"] == 25.0
        assert calls == [(0.001, "validation"), (0.003, "validation"), (0.01, "validation"), (0.003, "test")]
    calls.clear()
    assert demo.tune_and_test(500, "pretrained", 3, args, [0.01])["learning_rate"] == 0.01
    assert calls == [(0.01, "test")]  # one rate: nothing to choose, no validation decoding


def test_the_grid_is_searched_on_the_first_seed_and_reused_unless_every_seed_searches(monkeypatch, tmp_path):
    searched = []

    def fake_tune(size, label, seed, args, learning_rates, extra_bindings=()):
        searched.append((label, seed, tuple(learning_rates)))
        best = {"pretrained": 0.003, "from scratch": 0.01}[label] if len(learning_rates) > 1 else learning_rates[0]
        return {"seed": seed, "learning_rate": best}

    monkeypatch.setattr(demo, "tune_and_test", fake_tune)
    args = demo.parse_args(["--out", str(tmp_path), "--seeds", "0,1,2"])
    per_arm = demo.compare(2000, args)
    grid = (0.003, 0.01)
    assert searched == [("pretrained", 0, grid), ("from scratch", 0, grid), ("pretrained", 1, (0.003,)),
                        ("from scratch", 1, (0.01,)), ("pretrained", 2, (0.003,)), ("from scratch", 2, (0.01,))]
    assert [r["learning_rate"] for r in per_arm["from scratch"]] == [0.01, 0.01, 0.01]
    searched.clear()
    demo.compare(2000, demo.parse_args(["--out", str(tmp_path), "--search_every_seed"]))
    assert [lrs for _, _, lrs in searched] == [grid] * 4
    searched.clear()
    demo.compare(500, args, chosen={(label, s): 0.001 for label, _, _ in demo.ARMS for s in (0, 1, 2)})
    assert [lrs for _, _, lrs in searched] == [(0.001,)] * 6  # the curve: rates fixed by the demo's choice


def _arm_runs(chrfs, lr=0.01):
    return [{"seed": s, "learning_rate": lr, "test": {"chrf": c, "bleu": c / 10, "perplexity": 100 - c},
             "grid": [{"stage": {"wall_s": 10.0}}, {"stage": {"wall_s": 5.0}}]} for s, c in enumerate(chrfs)]


def test_summary_means_spreads_and_the_every_seed_verdict():
    summary = demo.summarize({"pretrained": _arm_runs([30.0, 34.0]), "from scratch": _arm_runs([20.0, 29.0])})
    pre = summary["arms"]["pretrained"]
    assert pre["chrf"] == {"mean": 32.0, "min": 30.0, "max": 34.0, "values": [30.0, 34.0]}
    assert pre["perplexity"]["mean"] == 68.0 and pre["train_wall_s"] == 30.0 and pre["seeds"] == [0, 1]
    assert summary["chrf_gain"] == pytest.approx(32.0 - 24.5) and summary["every_seed_wins"]
    overlap = demo.summarize({"pretrained": _arm_runs([30.0, 34.0]), "from scratch": _arm_runs([20.0, 31.0])})
    assert overlap["chrf_gain"] > 5 and not overlap["every_seed_wins"]  # seed 0 pretrained < seed 1 scratch


def test_copy_baseline_scores_the_english_source_without_the_task_prefix():
    verse = "In the beginning, God created the heavens and the earth."
    same = demo.copy_baseline([{"input": demo.SOURCE_PREFIX + verse, "target": verse}])
    assert same["chrf"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)  # the prefix is not copied
    spanish = [{"input": demo.SOURCE_PREFIX + verse, "target": "En el principio crió Dios los cielos y la tierra."}]
    assert 0.0 < demo.copy_baseline(spanish)["chrf"] < 50.0
    task = tasks.get(demo.TASK)  # the prefix is the one the task renders
    record = task.source("test")[0]
    assert task.preprocessors_fn(None, None)[0](dict(record), None)["inputs"] == demo.SOURCE_PREFIX + record["en_web"]


def test_curve_steps_keep_the_epochs_of_the_demo_up_to_a_cap():
    assert demo_curve.finetune_steps(500, 2000, 150, 29827) == 150      # smaller sets: the demo's steps
    assert demo_curve.finetune_steps(2000, 2000, 150, 29827) == 150
    assert demo_curve.finetune_steps(4000, 2000, 150, 29827) == 300     # same epochs
    assert demo_curve.finetune_steps(None, 2000, 150, 29827) == 150 * demo_curve.MAX_STEP_MULTIPLE


def test_curve_table_reports_both_metrics_and_lower_perplexity_wins(tmp_path):
    def point(pairs, pre_ppl, scratch_ppl):
        per_arm = {"pretrained": [{"seed": s, "learning_rate": 0.01, "test": {"chrf": 12.0, "bleu": 1.0, "perplexity": v}}
                                  for s, v in enumerate(pre_ppl)],
                   "from scratch": [{"seed": s, "learning_rate": 0.01, "test": {"chrf": 11.0, "bleu": 1.0, "perplexity": v}}
                                    for s, v in enumerate(scratch_ppl)]}
        for runs in per_arm.values():
            for r in runs:
                r["grid"] = [{"stage": {"wall_s": 1.0}}]
        return {"pairs": pairs, "steps": 100, "summary": demo.summarize(per_arm), "num_examples": 200}
    points = [point(500, (400.0, 500.0), (700.0, 720.0)), point(8000, (60.0, 70.0), (65.0, 66.0))]
    rows = demo_curve.curve_markdown(points, "2 CPU cores", 17.8).splitlines()[4:]
    assert rows[0].endswith("| 450.0 (400.0–500.0) | 710.0 (700.0–720.0) | yes |")  # every seed lower
    assert rows[1].endswith("| no |")  # the seeds overlap
    demo_curve.plot_curve(points, str(tmp_path / "curve.png"), 17.8)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def _demo(out, *flags, module="t5lite.demos.demo"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(demo.__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out), *flags],
                         check=False, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_quick_demo_runs_every_stage_reports_and_resumes(tmp_path):
    out = tmp_path / "demo"
    stdout = _demo(out)
    assert "Regime: 2,000 labelled pairs" in stdout
    assert "| pretrained |" in stdout and "| from scratch |" in stdout and "Example 3" in stdout
    assert "| no model: copy the English source |" in stdout
    assert "above the copy-the-source floor: pretrained " in stdout
    results = json.loads((out / "results.json").read_text())
    assert 0.0 < results["copy_baseline"]["chrf"] < 100.0
    assert results["seeds"] == [0, 1] and results["learning_rates"] == [0.003, 0.01]
    for label, arm in results["summary"]["arms"].items():
        assert len(arm["chrf"]["values"]) == 2 and all(lr in (0.003, 0.01) for lr in arm["learning_rates"])
        for key in ("chrf", "bleu", "perplexity"):
            assert math.isfinite(arm[key]["mean"]) and arm[key]["min"] <= arm[key]["mean"] <= arm[key]["max"]
        first, second = results["runs"][label]
        assert len(first["grid"]) == 2 and all(g["validation"]["num_examples"] == 8 for g in first["grid"])
        assert len(second["grid"]) == 1 and second["learning_rate"] == first["learning_rate"]  # reused
        for run in (first, second):
            assert run["test"]["num_examples"] == 16
            assert os.path.isdir(os.path.join(run["model_dir"], "checkpoints", str(demo.QUICK_STEPS["finetune"])))
    assert results["summary"]["chrf_gain"] == pytest.approx(results["summary"]["arms"]["pretrained"]["chrf"]["mean"]
                                                            - results["summary"]["arms"]["from scratch"]["chrf"]["mean"])
    started_from = (out / "finetune/n2000/pretrained_seed0_lr0.01/config.gin").read_text()
    assert "INITIAL_CHECKPOINT_PATH = " in started_from and f"'{out / 'pretrain'}'" in started_from
    assert "INITIAL_CHECKPOINT_PATH = None" in (out / "finetune/n2000/scratch_seed0_lr0.01/config.gin").read_text()
    assert len(results["examples"]) == 3 and all(ex["pretrained"] is not None for ex in results["examples"])
    for png in ("loss_curves.png", "finetune_vs_scratch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pretrained |" in (out / "results.md").read_text()

    again = _demo(out)  # every stage and every evaluation is done: skipped
    assert again.count("already trained") == 1 + 2 * (2 + 1) and "validation chrF" in again
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    curve = _demo(out, "--curve_sizes", "100,2000", module="t5lite.demos.curve")  # the demo's size is reused
    assert curve.count("already trained") == 1 + 2 * (2 + 1) and "| 100 |" in curve and "| 2,000 |" in curve
    assert "copying the English source scores" in curve
    assert json.loads((out / "curve.json").read_text())["copy_chrf"] == pytest.approx(results["copy_baseline"]["chrf"])
    points = json.loads((out / "curve.json").read_text())["points"]
    assert [p["pairs"] for p in points] == [100, 2000] and (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    for label in ("pretrained", "from scratch"):  # 100 pairs reuse each seed's choice at 2,000
        assert points[0]["learning_rates"][label] == points[1]["learning_rates"][label]

    fresh = _demo(out, "--fresh", "--seeds", "0", "--learning_rates", "0.01")
    assert "already trained" not in fresh and not (out / "curve.json").exists()
    assert not (out / "finetune" / "n100").exists() and not (out / "finetune" / "n2000" / "scratch_seed0_lr0.003").exists()
    assert json.loads((out / "results.json").read_text())["seeds"] == [0]
