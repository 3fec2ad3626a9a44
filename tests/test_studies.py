"""The shipped studies (experiments/studies/*.toml): multi-stage sweep points, shared stages, scores and the results
page each study's command writes. The toy runs here take the place of `t5lite train` / `t5lite eval` with a small
stand-in program (no jax: it writes the checkpoint directory, metrics and eval results a run would), so every
study's pipeline from command to page is checked in seconds; tests/test_studies_run.py trains one for real."""

import glob
import json
import os
import re
import sys

import numpy as np
import pytest
import scipy.stats

from t5lite.cli import main
from t5lite.errors import UserError
from t5lite.scaling import results, spec, summary, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = os.path.join(REPO, "experiments", "studies")
NAMES = ("positions", "objectives", "instruct", "distill", "lora", "scaling")

# Two variants of each study (the baseline first) and the flags that shrink it; the stand-in reads TRAIN_STEPS.
TOY = {
    "positions": ["--grid", "T5Config.position_scheme=[t5_relative_bias, rope]", "--seeds", "2"],
    "objectives": ["--grid", "objective=[span_corruption, decoder_only_causal_lm]", "--seeds", "2"],
    "instruct": ["--seeds", "2"],
    "distill": ["--seeds", "2"],
    "lora": ["--grid", "method=[full, lora_r4]", "--seeds", "2"],
    "scaling": ["--grid", "size=[s1, s2, s3]", "--grid", "TRAIN_STEPS=[2, 3]", "--fit", "--bootstrap", "2"],
}

STAND_IN = '''#!{python}
import json, os, sys, zlib
args = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
def flag(prefix):
    values = [a[len(prefix):] for a in args if a.startswith(prefix)]
    return values[-1] if values else None
def noise(text):
    return (zlib.crc32(text.encode()) % 1000) / 1000.0
if args[2] == "train":
    model_dir, steps = flag("--model_dir="), int(flag("--gin.TRAIN_STEPS="))
    os.makedirs(os.path.join(model_dir, "checkpoints", str(steps)))
    width = float(flag("--gin.T5Config.emb_dim=") or 64)  # a loss that falls with width and steps (scaling fit)
    loss = 2.0 + 30.0 / width ** 0.5 + 5.0 / steps ** 0.5 + 0.01 * noise(model_dir)
    with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({{"step": steps, "loss": loss + 0.1, "eval/loss": loss}}) + "\\n")
elif os.environ.get("STAND_IN_EVAL_ERROR"):
    print("t5lite: error: " + os.environ["STAND_IN_EVAL_ERROR"])
    sys.exit(2)
else:  # eval: a metric value that differs per checkpoint and task
    where = args[args.index("--card" if "--card" in args else "--checkpoint") + 1]
    task = args[args.index("--task") + 1]
    value = 100.0 * noise(where + task)
    print(json.dumps({{"task": task, "chrf": value, "accuracy": value, "num_examples": 2}}))
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """sys.executable -> the stand-in; returns a function giving the argument lists of its train / eval calls."""
    path = tmp_path / "python"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    monkeypatch.setattr(sys, "executable", str(path))

    def calls(kind):
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        return [c for c in lines if c[2] == kind]
    return calls


def _study(name):
    return os.path.join(STUDIES, f"{name}.toml")


def _toy_run(name, tmp_path, capsys):
    root, page = str(tmp_path / "root"), str(tmp_path / "results" / f"{name}.md")
    args = ["sweep", "run", _study(name), f"--root={root}", f"--results={page}", "--gin.TRAIN_STEPS=3", "--gin.train.warmup_steps=1",
            "--eval_examples", "2", *TOY[name]]
    assert main(args) == 0, capsys.readouterr().err
    return root, page, args


@pytest.mark.parametrize("name", NAMES)
def test_each_study_runs_from_its_command_to_its_results_page(name, tmp_path, capsys, stand_in, monkeypatch):
    from t5lite.scaling import fit
    monkeypatch.setattr(fit, "SCALE_GRID", (0.0, 5.0, 10.0))  # fewer L-BFGS starts (as test_scaling_fit.py does)
    monkeypatch.setattr(fit, "E_GRID", (0.0, 1.0))
    monkeypatch.setattr(fit, "EXPONENT_GRID", (0.25, 0.75))
    root, page, args = _toy_run(name, tmp_path, capsys)
    with open(page) as f:
        text = f.read()
    s = spec.build_sweep(_study(name), grid=[g for i, g in enumerate(TOY[name]) if i and TOY[name][i - 1] == "--grid"])
    assert f"**Question.** {s.study['question']}" in text and f"**The paper's answer.** {s.study['paper']}" in text
    assert re.search(r"^- Machine: .+, \d+ cores$", text, re.M)
    assert re.search(r"^- Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
    assert re.search(r"^- Commit: \S+", text, re.M)
    assert f"- Command: `t5lite sweep run {_study(name)} --root={root}" in text
    assert os.path.isfile(os.path.splitext(page)[0] + ".png")
    rows = summary.read_rows(root)
    assert all(r["status"] == "done" for r in rows)
    for r in rows:  # every point is a row of the page's points table
        assert re.search(rf"^\| {re.escape(r['name'])} \| done \|", text, re.M)
    if name == "scaling":  # the fit, its intervals and the held-out point's error instead of Welch
        assert "L(N, D) = E + A/N^alpha + B/D^beta on 6 points" in text and "held out size-s6" in text
        assert "bootstrap intervals over 2 resamples" in text
    else:
        _check_welch_table(text, rows, s)
    if name == "instruct":  # two held-out tasks, each in its own metric: the compared value is their mean
        assert ("| mean of accuracy on instruct_identify_language_zero_shot, chrf on "
                "instruct_archaize_web_kjv_zero_shot (mean ± std) |") in text
    # The same command again: nothing trains or decodes, the page is rebuilt from the run directories.
    trained, decoded = len(stand_in("train")), len(stand_in("eval"))
    os.remove(page)
    assert main(args) == 0
    assert len(stand_in("train")) == trained and len(stand_in("eval")) == decoded
    with open(page) as f:
        assert _without_date(f.read()) == _without_date(text)


def _without_date(text):
    return re.sub(r"^- Date: .*$", "", text, flags=re.M)


def _check_welch_table(text, rows, s):
    """The over-seeds table: mean ± std of the compared value per variant and Welch's p as scipy computes it."""
    axis = s.axes[0].name
    compared = "score" if s.score else "eval_loss"
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r[axis], []).append(r[compared])
    base_label = dict(s.baseline_values())[axis]
    other = next(v for v in by_variant if v != base_label)
    a, b = by_variant[other], by_variant[base_label]
    assert len(a) == len(b) == 2
    p = scipy.stats.ttest_ind(a, b, equal_var=False).pvalue
    line = next(line for line in text.splitlines() if line.startswith(f"| {axis}={other} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[2] == f"{summary.fmt(float(np.mean(a)))} ± {summary.fmt(float(np.std(a, ddof=1)), 2)}"
    assert float(cells[3]) == pytest.approx(np.mean(a) - np.mean(b), rel=1e-3)
    assert float(cells[4]) == pytest.approx(p, rel=1e-3)
    noise = p < results.NOISE_P and abs(np.mean(a) - np.mean(b)) > max(np.std(a, ddof=1), np.std(b, ddof=1))
    assert cells[5] == ("yes" if noise else "no")
    higher_is_better = compared == "score"
    direction = "better" if (np.mean(a) > np.mean(b)) == higher_is_better else "worse"
    finding = (rf"^- {re.escape(axis)}={other}: .*\(.*, Welch p = {re.escape(summary.fmt(p, 2))}\): {direction} than "
               rf"{re.escape(axis)}={base_label}, (beyond|within) the seeds' noise\.$")
    assert re.search(finding, text, re.M), text  # the finding, in words


# ---------------------------------------------------------------------------------------------
# The stages' wiring, planned (no training).
# ---------------------------------------------------------------------------------------------

def _plans(name, root, **kwargs):
    return sweep.plan_sweep(spec.build_sweep(_study(name), **kwargs), root)


def _config(plan):
    """The run's config.gin text with gin's wrapped long lines joined."""
    return re.sub(r"\\\n\s*", "", plan.config_text)


def _gin(plan, name):
    """The value bound last to `name` in a run's arguments."""
    values = [a.split("=", 1)[1] for a in plan.args if a.startswith(f"--gin.{name}=")]
    return values[-1] if values else None


def test_every_lora_rank_and_full_fine_tuning_start_from_one_shared_base(tmp_path):
    root = str(tmp_path)
    plans = _plans("lora", root)
    assert len(plans) == 10 and all(p.error is None for p in plans)
    bases = {up.model_dir for p in plans for up in p.upstream}
    assert bases == {os.path.join(root, "pretrain", "seed-0")}  # one base, whatever the seed of the fine-tuning
    assert len(sweep.all_runs(plans)) == 11
    for p in plans:
        assert f"INITIAL_CHECKPOINT_PATH = '{os.path.join(root, 'pretrain', 'seed-0')}'" in _config(p)
        method = dict(p.point.values)["method"]
        assert p.facts["adapter"] == (method != "full")
        if method != "full":
            assert f"LoraConfig.rank = {method[len('lora_r'):]}" in _config(p)
    trainable = {dict(p.point.values)["method"]: p.facts["params_trainable"] for p in plans}
    # A rank-r card on q, k, v, o (d 64 -> 64) and wi (64 -> 2 x 128), wo (128 -> 64) in 2 + 2 layers (+ cross-
    # attention's 4 in the decoder): r x (in + out) per projection.
    per_rank = (2 + 2) * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64)) + 2 * 4 * (64 + 64)
    assert trainable["lora_r1"] == per_rank and trainable["lora_r16"] == 16 * per_rank
    assert trainable["full"] == plans[0].facts["params"]


def test_the_distilled_student_names_the_one_teacher_and_the_student_alone_none(tmp_path):
    root = str(tmp_path)
    plans = _plans("distill", root)
    teacher = os.path.join(root, "teacher", "seed-0")
    assert {up.model_dir for p in plans for up in p.upstream} == {teacher}
    for p in plans:
        alone = dict(p.point.values)["student"] == "alone"
        assert _gin(p, "train.teacher_checkpoint") == ("%NO_TEACHER" if alone else repr(teacher))
        assert ("train.teacher_checkpoint = %NO_TEACHER" if alone else f"train.teacher_checkpoint = '{teacher}'") in \
            _config(p)
        assert "NO_TEACHER = None" in _config(p)
        assert ("train.loss = 'distillation'" in _config(p)) != alone
    assert plans[0].upstream[0].facts["params"] > 3 * plans[0].facts["params"]  # the teacher is the larger model


def test_objectives_vary_pre_training_only_and_keep_the_architecture_in_both_stages(tmp_path):
    root = str(tmp_path)
    plans = _plans("objectives", root)
    pretrain_dirs = {p.upstream[0].model_dir for p in plans}
    assert len(pretrain_dirs) == len(plans) == 10  # each objective and seed pre-trains its own model
    by = {(dict(p.point.values)["objective"], p.point.seed): p for p in plans}
    sc, clm = by[("span_corruption", 0)], by[("decoder_only_causal_lm", 1)]
    assert _gin(sc.upstream[0], "MIXTURE_OR_TASK_NAME") is None  # studies/pretrain.gin's span corruption
    assert _gin(clm.upstream[0], "MIXTURE_OR_TASK_NAME") == "'bible_clm_en_es'"
    assert _gin(clm, "MIXTURE_OR_TASK_NAME") is None  # the prefix binding stays in its stage
    for stage in (clm.upstream[0], clm):
        assert _gin(stage, "train.decoder_only") == "True" and "RANDOM_SEED = 1" in _config(stage)
    assert clm.facts["task"] == sc.facts["task"] == "bible_modernize_kjv_web"
    assert clm.facts["train_steps"] == sc.facts["train_steps"]  # the same fine-tuning
    flops = [p.upstream[0].facts["flops"] for p in plans]
    assert max(flops) / min(flops) < 1.05  # equal pre-training FLOPs, within 5 %


def test_the_instruct_base_is_the_tuned_models_start_and_is_scored_where_it_stops(tmp_path):
    root = str(tmp_path)
    plans = _plans("instruct", root)
    by = {(dict(p.point.values)["tuning"], p.point.seed): p for p in plans}
    for seed in (0, 1):
        base, tuned = by[("base", seed)], by[("instruction_tuned", seed)]
        assert base.stage == "pretrain" and not base.upstream
        assert tuned.upstream[0].model_dir == base.model_dir == os.path.join(root, "pretrain", f"seed-{seed}")
        assert f"INITIAL_CHECKPOINT_PATH = '{base.model_dir}'" in _config(tuned)


def test_a_grid_flag_narrows_a_study_axis_and_gin_flags_come_last_in_a_stage():
    s = spec.build_sweep(_study("objectives"), grid=["objective=[ul2]"], bindings=["pretrain:TRAIN_STEPS=2"])
    run = s.points()[0].runs[0]
    assert [p.name for p in s.points()] == ["objective-ul2_seed-0", "objective-ul2_seed-1"]
    assert run.bindings.index("TRAIN_STEPS=2") > run.bindings.index("TRAIN_STEPS=59")
    with pytest.raises(UserError, match="'nope' is not a value of the sweep file's axis"):
        spec.build_sweep(_study("objectives"), grid=["objective=[nope]"])


@pytest.mark.parametrize("edit, message", [
    (('init_from = "pretrain"', 'init_from = "later"'), "init_from = 'later' is not an earlier stage"),
    (('"pretrain:TRAIN_STEPS" = 59', '"pretrian:TRAIN_STEPS" = 59'), "names stage 'pretrian'"),
    (('metric = "chrf"', 'metrics = "chrf"'), r"\[score\] needs tasks"),
])
def test_stage_mistakes_fail_in_one_line(tmp_path, edit, message):
    with open(_study("objectives")) as f:
        text = f.read()
    assert edit[0] in text
    path = tmp_path / "objectives.toml"
    path.write_text(text.replace(edit[0], edit[1]))  # its gin files are found among the shipped recipes
    with pytest.raises(UserError, match=message) as e:
        spec.build_sweep(str(path))
    assert "\n" not in str(e.value)


def test_every_study_has_its_make_target_budget_and_readme_line():
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(STUDIES, "*.toml"))) == sorted(NAMES)
    for name in NAMES:
        with open(_study(name)) as f:
            header = "".join(line for line in f if line.startswith("#"))
        for part in ("Study:", "The paper's answer:", "Budget:", "estimate", f"make study-{name}",
                     f"t5lite sweep run experiments/studies/{name}.toml"):
            assert part in header, (name, part)
        assert re.search(rf"^study-{name}: ", makefile, re.M) and f"experiments/studies/{name}.toml" in makefile
        assert f"(docs/results/{name}.md)" in readme and f"make study-{name}" in readme
    assert re.search(r"^STUDIES := " + " ".join(NAMES) + r"\b", makefile, re.M)
    assert re.search(r"^studies: \$\(addprefix study-,\$\(STUDIES\)\)$", makefile, re.M)


def test_noise_needs_a_small_p_and_a_difference_above_both_spreads():
    group = {"compared": "score", "p_value": 0.01, "score_std": 1.0, "delta_score": 1.5}
    assert results.beyond_noise(group, {"score_std": 1.2}) is True
    assert results.beyond_noise(group, {"score_std": 2.0}) is False  # p small, but within the baseline's spread
    assert results.beyond_noise({**group, "p_value": 0.2}, {"score_std": 0.1}) is False
    assert results.beyond_noise({**group, "p_value": None}, {"score_std": 0.1}) is None



def test_the_instruction_stage_evaluates_on_its_mixtures_validation_split(tmp_path):
    # The sweep gives every run a final evaluation; a mixture's validation split is its tasks' (run.py once read a
    # mixture's `source`, which only a task has).
    from t5lite import gin_utils
    from t5lite.train.run import Run
    gin_utils.parse([os.path.join(STUDIES, "instruct.gin")],
                    ["TRAIN_STEPS=2", "BATCH_SIZE=2", "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
                     "EVAL_PERIOD=2", "train.eval_batches=1"], str(tmp_path / "m"))
    run = Run.build(gin_utils.train_config())
    metrics = run.evaluate(run.initial_state().params)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0, metrics


def test_a_point_whose_scoring_fails_fails_the_command_in_one_line(tmp_path, capsys, stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_EVAL_ERROR", "no such split")
    args = ["sweep", "run", _study("lora"), f"--root={tmp_path / 'root'}", f"--results={tmp_path / 'p.md'}",
            "--gin.TRAIN_STEPS=3", "--gin.train.warmup_steps=1", "--grid", "method=[full]", "--seeds", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5lite: error: 1 of 1 points did not finish or were not scored (method-full_seed-0: "
                          "done, not scored: no such split)") and "\n" not in err
