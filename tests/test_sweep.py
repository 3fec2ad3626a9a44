"""Sweeps without training: definitions (grid flags, sweep files, names), planning, the runner around a stand-in
process, summaries and Welch's t-test."""

import glob
import math
import os
import shlex
import signal
import threading
import time

import numpy as np
import pytest
from scipy import stats

from t5lite.errors import UserError
from t5lite.model import T5Config
from t5lite.scaling import spec, summary, sweep
from t5lite.train.monitor import model_flops_per_step

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
BASE = ["experiments/demo/pretrain.gin", "experiments/models/tiny.gin"]


def test_grid_flags_expand_to_the_cartesian_product_times_seeds_last_axis_fastest():
    s = spec.build_sweep(gin_files=BASE, grid=["T5Config.emb_dim=[32, 64]", "train.optimizer=[adafactor, 'adamw']"],
                         seeds=2, bindings=["TRAIN_STEPS=3"])
    points = s.points()
    assert [p.name for p in points] == [
        f"emb_dim-{d}_optimizer-{o}_seed-{seed}" for d in (32, 64) for o in ("adafactor", "adamw") for seed in (0, 1)]
    assert points[3].bindings == ("T5Config.emb_dim=32", "train.optimizer='adamw'", "RANDOM_SEED=1")
    assert dict(points[3].values) == {"T5Config.emb_dim": "32", "train.optimizer": "adamw"}
    assert s.bindings == ("TRAIN_STEPS=3",)
    assert s.baseline_values() == (("T5Config.emb_dim", "32"), ("train.optimizer", "adafactor"))


def test_grid_values_with_commas_inside_brackets_and_quotes():
    axis = spec.parse_grid_flag("TASK_FEATURE_LENGTHS=[{'inputs': 32, 'targets': 8}, {'inputs': 64, 'targets': 14}]")
    assert axis.labels == ("{'inputs': 32, 'targets': 8}", "{'inputs': 64, 'targets': 14}")
    s = spec.build_sweep(gin_files=BASE, grid=["TASK_FEATURE_LENGTHS=[{'inputs': 32, 'targets': 8}]"])
    assert s.points()[0].name == "TASK_FEATURE_LENGTHS-inputs_32_targets_8_seed-0"
    assert spec.parse_grid_flag("T5Config.mlp_activations=[('relu',), ('gelu', 'linear')]").labels == (
        "('relu',)", "('gelu', 'linear')")


@pytest.mark.parametrize("flag, message", [("T5Config.emb_dim=64", "NAME=\\[value1"), ("X=[]", "no values"),
                                           ("X=[1, 1]", "repeats")])
def test_bad_grid_flags_fail_in_one_line(flag, message):
    with pytest.raises(UserError, match=message):
        spec.parse_grid_flag(flag)


def test_an_axis_given_twice_or_no_gin_file_fails():
    with pytest.raises(UserError, match="given twice"):
        spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[1]", "TRAIN_STEPS=[2]"])
    with pytest.raises(UserError, match="--gin_file"):
        spec.build_sweep(grid=["TRAIN_STEPS=[1]"])


SWEEP_FILE = """
gin_files = ["demo/pretrain.gin", "models/tiny.gin"]
seeds = [3, 5]
baseline = {size = "b", TRAIN_STEPS = 4}
[bindings]
"train.progress" = "off"
TASK_FEATURE_LENGTHS = {inputs = 32, targets = 8}
[grid]
size = ["a", "b"]
TRAIN_STEPS = [2, 4]
[named.size.a]
"T5Config.emb_dim" = 32
"T5Config.mlp_activations" = ["relu"]
[named.size.b]
"T5Config.emb_dim" = 48
[named.size.big]
"T5Config.emb_dim" = 96
[[extra]]
size = "big"
TRAIN_STEPS = 3
held_out = true
"""


def test_sweep_file_named_axes_extra_points_seeds_and_baseline(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(SWEEP_FILE)
    s = spec.build_sweep(str(path))
    assert s.gin_files == tuple(os.path.relpath(os.path.join(EXPERIMENTS, f)) for f in ("demo/pretrain.gin",
                                                                                         "models/tiny.gin"))
    assert s.bindings == ("train.progress='off'", "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}")
    points = s.points()
    assert len(points) == (2 * 2 + 1) * 2
    assert points[0].name == "size-a_TRAIN_STEPS-2_seed-3"
    assert points[0].bindings == ("T5Config.emb_dim=32", "T5Config.mlp_activations=['relu']", "TRAIN_STEPS=2",
                                  "RANDOM_SEED=3")
    held = [p for p in points if p.held_out]
    assert [p.name for p in held] == ["size-big_TRAIN_STEPS-3_seed-3", "size-big_TRAIN_STEPS-3_seed-5"]
    assert held[0].bindings == ("T5Config.emb_dim=96", "TRAIN_STEPS=3", "RANDOM_SEED=3")
    assert s.baseline_values() == (("size", "b"), ("TRAIN_STEPS", "4"))
    assert spec.build_sweep(str(path), seeds=1).seeds == (0,)  # --seeds replaces the file's


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('size = "big"\n', ""), "a value for each axis"),
    (lambda t: t.replace('size = "big"', 'size = "huge"'), "not a value of axis size"),
    (lambda t: t.replace("seeds = [3, 5]", "seeds = 0"), "seeds must be"),
    (lambda t: "bogus = 1\n" + t, "unknown key"),
    (lambda t: t.replace('"models/tiny.gin"', '"models/nope.gin"'), "not found"),
    (lambda t: t.replace("TRAIN_STEPS = [2, 4]", "TRAIN_STEPS = [2, 4"), "not valid TOML"),
])
def test_sweep_file_mistakes_fail_in_one_line(tmp_path, edit, message):
    path = tmp_path / "x.toml"
    path.write_text(edit(SWEEP_FILE))
    with pytest.raises(UserError, match=message):
        spec.build_sweep(str(path))


def test_gin_literals_of_toml_values():
    assert spec.gin_literal("rope") == "'rope'" and spec.gin_literal("@foo()") == "@foo()"
    assert spec.gin_literal(True) == "True" and spec.gin_literal(0.01) == "0.01"
    assert spec.gin_literal([1, "a"]) == "[1, 'a']" and spec.gin_literal({"inputs": 8}) == "{'inputs': 8}"


def test_plan_computes_n_d_c_and_adds_a_final_evaluation():
    s = spec.build_sweep(gin_files=BASE, grid=["T5Config.emb_dim=[32]"], bindings=["TRAIN_STEPS=5"])
    plan = sweep.plan_sweep(s, "root")[0]
    assert plan.error is None and plan.model_dir == os.path.join("root", "emb_dim-32_seed-0")
    facts = plan.facts
    config = T5Config(vocab_size=8192, emb_dim=32, num_heads=4, head_dim=16, mlp_dim=128, num_encoder_layers=2,
                      num_decoder_layers=2)
    # tiny.gin: batch 8; demo/pretrain.gin: lengths 128 / 29.
    assert facts["tokens"] == 5 * 8 * (128 + 29) and facts["target_tokens"] == 5 * 8 * 29
    assert facts["flops"] == 5 * model_flops_per_step(config, 8, 128, 29)
    # Embedding 8192 x 32 and the untied logits layer 32 x 8192 are the embedding parameters.
    assert facts["params"] - facts["params_non_embedding"] == 2 * 8192 * 32
    assert plan.args[-1] == "--gin.train.eval_period=5"
    assert shlex.split(sweep.command_line(plan)) == ["t5lite", "train", *plan.args]


def test_a_bad_point_is_planned_with_its_error_and_never_launched(tmp_path):
    s = spec.build_sweep(gin_files=BASE, grid=["T5Config.num_heads=[0, 2]"], bindings=["TRAIN_STEPS=2"])
    bad, good = sweep.plan_sweep(s, str(tmp_path))
    assert bad.error == "T5Config.num_heads must be positive, got 0" and good.error is None
    # /bin/false as the interpreter: a launch would record another error than the plan's.
    assert sweep.run_point(bad, python="/bin/false", say=lambda _: None) == "failed"
    row = summary.point_row(bad)
    assert row["status"] == "failed" and row["error"] == bad.error and not os.path.exists(
        os.path.join(bad.model_dir, "train.log"))


@pytest.mark.parametrize("grid, bindings, message", [
    ("train.optimizer=[nope]", [], "unknown optimizer 'nope'; choose from adafactor, adamw"),
    ("TRAIN_STEPS=[3]", ["train.schedule='cosine'", "train.warmup_steps=40"],
     "cosine schedule needs total_steps > warmup_steps (40), got 3"),
    ("TRAIN_STEPS=[2.5]", [], "train.train_steps (TRAIN_STEPS) must be an integer >= 1, got 2.5"),
])
def test_settings_train_would_refuse_are_found_when_planning(grid, bindings, message):
    plan, = sweep.plan_sweep(spec.build_sweep(gin_files=BASE, grid=[grid], bindings=bindings), "root")
    assert plan.error is not None and plan.error.startswith(message)


def test_non_embedding_parameters_leave_out_tokens_logits_and_absolute_positions():
    s = spec.build_sweep(gin_files=BASE, grid=["T5Config.position_scheme=[sinusoidal, absolute_learned]"])
    sinusoidal, learned = (p.facts for p in sweep.plan_sweep(s, "root"))
    assert learned["params_non_embedding"] == sinusoidal["params_non_embedding"]
    # One 512 x 64 learned table per stack (T5Config.max_position_embeddings x emb_dim).
    assert learned["params"] - sinusoidal["params"] == 2 * 512 * 64


def test_a_run_directory_of_another_configuration_is_not_resumed(tmp_path):
    s = spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[2]"])
    plan = sweep.plan_sweep(s, str(tmp_path))[0]
    os.makedirs(plan.model_dir)
    with open(os.path.join(plan.model_dir, "config.gin"), "w") as f:
        f.write(plan.config_text.replace("TRAIN_STEPS = 2", "TRAIN_STEPS = 7"))
    assert sweep.run_point(plan, python="/bin/false", say=lambda _: None) == "failed"
    assert "another configuration" in summary.point_row(plan)["error"]


def test_a_point_trained_elsewhere_is_skipped_and_has_no_wall_time(tmp_path):
    plan = sweep.plan_sweep(spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[2]"]), str(tmp_path))[0]
    os.makedirs(os.path.join(plan.model_dir, "checkpoints", "2"))  # what a --print_commands line leaves
    assert sweep.run_point(plan, python="/bin/false", say=lambda _: None) == "skipped"
    row = summary.point_row(plan)
    assert row["status"] == "done" and row["wall_s"] is None


def _stand_in_python(tmp_path, body: str) -> str:
    """An executable that takes the place of `python -m t5lite.cli train ...` (its arguments are ignored)."""
    path = tmp_path / "python"
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return str(path)


def test_sigterm_reaches_the_running_point_and_stops_the_sweep(tmp_path):
    started = tmp_path / "started"
    python = _stand_in_python(tmp_path, f"trap 'echo saved a checkpoint; exit 0' TERM\ntouch {started}\n"
                                        "while true; do sleep 0.05; done\n")
    plans = sweep.plan_sweep(spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[2, 3]"]), str(tmp_path / "root"))

    def terminate_once_started():
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    counts = sweep.run_sweep(plans, str(tmp_path / "root"), python=python, say=lambda _: None)
    assert counts == {"interrupted": 1}
    first, second = (summary.point_row(p) for p in plans)
    assert first["status"] == "interrupted" and "run the sweep again" in first["error"]
    with open(os.path.join(plans[0].model_dir, "train.log")) as f:
        assert "saved a checkpoint" in f.read()
    assert second["status"] == "not run" and not os.path.exists(plans[1].model_dir)


def test_a_crashing_point_is_recorded_with_the_last_line_of_its_traceback(tmp_path):
    python = _stand_in_python(tmp_path, "echo 'Traceback (most recent call last):'\n"
                                        "echo 'jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory'\n"
                                        "exit 1\n")
    plan = sweep.plan_sweep(spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[2]"]), str(tmp_path))[0]
    assert sweep.run_point(plan, python=python, say=lambda _: None) == "failed"
    row = summary.point_row(plan)
    assert row["status"] == "failed"
    assert row["error"] == "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"


def test_task_metrics_decode_each_finished_point_once_and_join_its_row(tmp_path):
    args_file = tmp_path / "args"
    python = _stand_in_python(tmp_path, f'echo "$@" >> {args_file}\necho "INFO some log line"\n'
                                        'echo \'{"task": "t", "split": "validation", "bleu": 12.5, "chrf": 30.1, '
                                        '"num_examples": 4}\'\necho "INFO after the result"\n')
    s = spec.build_sweep(gin_files=BASE, grid=["TRAIN_STEPS=[2]"],
                         bindings=["MIXTURE_OR_TASK_NAME='bible_translate_en_es'"])
    plan = sweep.plan_sweep(s, str(tmp_path / "root"))[0]
    os.makedirs(os.path.join(plan.model_dir, "checkpoints", "2"))
    for _ in range(2):  # the second run finds task_metrics.json and decodes nothing
        sweep.run_point(plan, python=python, task_metrics=True, max_examples=7, say=lambda _: None)
    calls = args_file.read_text().splitlines()
    assert len(calls) == 1 and calls[0].split()[:6] == ["-m", "t5lite.cli", "eval", "--checkpoint", plan.model_dir,
                                                        "--task"]
    assert "--max_examples 7" in calls[0] and "--max_decode_length 29" in calls[0]
    row = summary.point_row(plan)
    assert row["task/bleu"] == 12.5 and row["task/chrf"] == 30.1 and "task/num_examples" not in row


def _shipped_sweep_files():
    return sorted(glob.glob(os.path.join(EXPERIMENTS, "**", "*.toml"), recursive=True))


@pytest.mark.parametrize("path", _shipped_sweep_files(), ids=lambda p: os.path.relpath(p, EXPERIMENTS))
def test_every_shipped_sweep_file_plans_without_errors(path):
    plans = sweep.plan_sweep(spec.build_sweep(path), "/tmp/unused")
    assert plans and all(p.error is None for p in plans), [p.error for p in plans if p.error]


def test_error_line_prefers_the_cli_error_then_the_exception():
    assert sweep.error_line(["step 1", "t5lite: error: unknown optimizer 'nope'; choose from adafactor\n", ""]) == (
        "unknown optimizer 'nope'; choose from adafactor")
    assert sweep.error_line(["Traceback (most recent call last):", '  File "x.py"', "ValueError: bad shape",
                             "I0000 some log line"]) == "ValueError: bad shape"


def test_welch_t_test_matches_scipy():
    a, b = [2.31, 2.35, 2.29, 2.40, 2.33], [2.45, 2.41, 2.52]
    t, df, p = summary.welch_t_test(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(reference.statistic, rel=1e-12)
    assert p == pytest.approx(reference.pvalue, rel=1e-10)
    assert df == pytest.approx(reference.df, rel=1e-12)
    assert all(math.isnan(x) for x in summary.welch_t_test([1.0], b))


def test_groups_over_seeds_mean_std_delta_and_p():
    losses = {"rope": [4.1, 4.3, 4.2], "t5": [4.0, 4.05, 3.98]}
    rows = [{"name": f"{k}{i}", "scheme": k, "seed": i, "held_out": False, "status": "done", "train_loss": v + 1,
             "eval_loss": v, "eval_accuracy": 0.5, "task/bleu": 10.0 + i, **{c: 7 for c in summary.FACT_COLUMNS}}
            for k, vs in losses.items() for i, v in enumerate(vs)]
    rows.append({**rows[0], "name": "crashed", "status": "failed", "eval_loss": None})
    groups = {g["scheme"]: g for g in summary.group_rows(rows, ["scheme"], [("scheme", "t5")])}
    rope, base = groups["rope"], groups["t5"]
    assert rope["n"] == 3 and rope["eval_loss_mean"] == pytest.approx(np.mean(losses["rope"]))
    assert rope["eval_loss_std"] == pytest.approx(np.std(losses["rope"], ddof=1))
    assert rope["delta_eval_loss"] == pytest.approx(np.mean(losses["rope"]) - np.mean(losses["t5"]))
    assert rope["p_value"] == pytest.approx(stats.ttest_ind(losses["rope"], losses["t5"], equal_var=False).pvalue)
    assert rope["task/bleu_mean"] == pytest.approx(11.0)
    assert base["baseline"] and base["p_value"] is None and base["delta_eval_loss"] == 0
    text = summary.tables(rows, list(groups.values()), ["scheme"])
    assert "| scheme=rope | 3 | 4.2 ± 0.1 |" in text and "baseline" in text
