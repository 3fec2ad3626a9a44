"""What `t5lite sweep run | summary | fit` do once their flags are parsed (see cli.py)."""

import json
import os
import sys

from t5lite.errors import UserError
from t5lite.scaling import summary as summary_lib
from t5lite.scaling.spec import build_sweep
from t5lite.scaling.sweep import all_runs, command_line, plan_sweep, run_sweep, shell_line


def _plans(args):
    sweep = build_sweep(args.sweep_file, args.gin_file, args.grid, args.seeds, args.gin)
    return sweep, plan_sweep(sweep, args.root)


# A wall-time model for 2 idle CPU cores, fitted loosely to the measured demo steps (35.6 GFLOP in 0.74-0.90 s:
# ~45 GFLOP/s) with margin: 30 GFLOP/s, 0.1 s of data and dispatch per step, 25 s per run to start jax,
# compile and evaluate, 30 s per scored task (start, load, greedy decoding of the score's examples).
EST_FLOPS_PER_S, EST_S_PER_STEP, EST_S_PER_RUN, EST_S_PER_SCORE = 30e9, 0.1, 25.0, 30.0


def estimate_seconds(plans, score=None) -> float:
    """Estimated wall time of a sweep on 2 idle CPU cores (an estimate from the model above, not a measurement)."""
    runs = all_runs(plans)
    scored = {p.model_dir for p in plans} if score else set()
    return (sum(EST_S_PER_RUN + p.facts.get("train_steps", 0) * EST_S_PER_STEP
                + p.facts.get("flops", 0) / EST_FLOPS_PER_S for p in runs)
            + len(scored) * len((score or {}).get("tasks", ())) * EST_S_PER_SCORE)


def _print_plan(plans, score=None) -> None:
    """--dry_run: what each point costs, so a grid can be designed with arithmetic before anything runs."""
    rows = [{"name": os.path.join(p.stage, os.path.basename(p.model_dir)) if p.stage else p.point.name, **p.facts,
             "error": p.error} for p in all_runs(plans)]
    print(summary_lib.markdown(rows, [("name", "run"), ("train_steps", "steps"), ("batch_size", "batch"),
                                      ("params_non_embedding", "N (non-emb.)"), ("params", "N (total)"),
                                      ("tokens", "D (tokens)"), ("flops_per_step", "FLOPs/step"),
                                      ("flops", "C (FLOPs)"), ("error", "error")]))
    runs = all_runs(plans)
    total = sum(p.facts.get("flops", 0) for p in runs)
    print(f"\n{len(plans)} points, {len(runs)} runs, {sum(p.facts.get('train_steps', 0) for p in runs)} steps, "
          f"{total:.3g} training FLOPs in all; estimated {estimate_seconds(plans, score) / 60:.0f} min on 2 idle "
          "CPU cores (30 GFLOP/s + 0.1 s a step + 25 s a run + 30 s a scored task: an estimate, not a measurement)")


def summarize(sweep, plans, root: str, results: str = None, command: str = "", fit: bool = False, args=None) -> list:
    """Writes the summary files (and ablation.png when some variant has 2+ seeds), prints the tables and, with
    `results`, writes the results page (with `fit`: the scaling-law fit instead of the table over seeds)."""
    axis_names = [a.name for a in sweep.axes]
    rows = [summary_lib.point_row(p, sweep.score) for p in plans]
    groups = summary_lib.group_rows(rows, axis_names, sweep.baseline_values(), "score" if sweep.score else None)
    text = summary_lib.write_summary(root, rows, groups, axis_names)
    print("\n" + text)
    written = ["summary.csv", "summary.jsonl", "summary.md", "groups.csv", "groups.jsonl"]
    if len(groups) > 1 and any(g["n"] > 1 for g in groups):
        from t5lite.scaling.plots import ablation_bars
        ablation_bars(groups, axis_names, os.path.join(root, "ablation.png"))
        written.append("ablation.png")
    print(f"\nwrote {', '.join(written)} to {root}")
    fit_text = None
    if fit:
        result = fit_root(root, args)
        fit_text = describe_fit(result)
    if results:
        _results_page(sweep, results, command, rows, groups, axis_names, root, fit_text)
    return rows


def results_path(sweep, flag):
    """--results, else a study file's docs/results/<study>.md, else None (no page)."""
    if flag:
        return flag
    return os.path.join("docs", "results", sweep.study["name"] + ".md") if sweep.study else None


def _results_page(sweep, path, command, rows, groups, axis_names, root, fit_text) -> None:
    from t5lite.scaling import results
    figure = os.path.splitext(path)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
    if fit_text:
        import shutil
        shutil.copyfile(os.path.join(root, "loss_vs_params.png"), figure)
    elif len(groups) > 1 and any(g["n"] > 1 for g in groups):
        from t5lite.scaling.plots import ablation_bars
        ablation_bars(groups, axis_names, figure)
    else:
        figure = None
    score = sweep.score or {}
    higher = bool(score.get("higher_is_better", True)) if score else False
    metric = score.get("metric")
    label = (None if not score else f"{metric} on {', '.join(score['tasks'])}" if isinstance(metric, str) else
             "mean of " + ", ".join(f"{m} on {t}" for t, m in metric.items()))
    results.write_page(path, study=sweep.study or {}, command=command, rows=rows, groups=groups,
                       axis_names=axis_names, higher_is_better=higher, figure=figure, fit_text=fit_text, label=label)
    print(f"wrote the results page {path}" + (f" and {figure}" if figure else ""))


def run(args) -> None:
    """Trains every point not yet done, one after another, then writes the summary (and fits with --fit)."""
    sweep, plans = _plans(args)
    if args.print_commands:
        for plan in all_runs(plans):  # a shared stage's run once, before the runs that start from it
            if not plan.error:
                print(command_line(plan))
        _raise_if_unplannable(plans)
        return
    if args.dry_run:
        _print_plan(plans, sweep.score)
        _raise_if_unplannable(plans)  # the table shows every point; a point that cannot run fails the dry run
        return
    counts = run_sweep(plans, args.root, python=sys.executable, skip_failed=args.skip_failed,
                       task_metrics=args.task_metrics, max_examples=args.eval_examples or 200, verbose=args.verbose,
                       score=_score_with(sweep.score, args.eval_examples))
    rows = summarize(sweep, plans, args.root, results_path(sweep, args.results),
                     shell_line(getattr(args, "argv", ["t5lite", "sweep", "run"])), args.fit, args)
    print(", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
    _raise_if_failed(rows, args.root, scored=sweep.score is not None)


def summary(args) -> None:
    """Re-reads the run directories (e.g. points launched elsewhere from --print_commands) and writes the summary."""
    if not os.path.isdir(args.root):  # a mistyped root would summarise nothing into a new directory
        raise UserError(f"sweep root {args.root} is not a directory; pass the --root of an existing sweep "
                        "(`t5lite sweep run` creates it)")
    sweep, plans = _plans(args)
    summarize(sweep, plans, args.root)
    if args.fit:
        fit_root(args.root, args)


def _score_with(score, examples):
    """--eval_examples replaces a [score]'s max_examples (a quick check decodes a few)."""
    return {**score, "max_examples": examples} if score and examples else score


def _raise_if_unplannable(plans) -> None:
    bad = [p for p in plans if p.error]
    if bad:
        names = ", ".join(p.point.name for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
        first = str(bad[0].error).strip().splitlines()[0] if str(bad[0].error).strip() else "invalid"
        raise UserError(f"{len(bad)} of {len(plans)} points cannot run ({names}); {bad[0].point.name}: {first}")


def _raise_if_failed(rows, root: str, scored: bool = False) -> None:
    """Exit 2 naming the first point that did not finish (or, in a study with a [score], was not scored)."""
    failed = [r for r in rows if r["status"] not in ("done",) or scored and r.get("score") is None]
    if failed:
        first = failed[0]
        state = "done, not scored" if first["status"] == "done" else first["status"]
        what = "did not finish or were not scored" if scored else "did not finish"
        raise UserError(f"{len(failed)} of {len(rows)} points {what} ({first['name']}: {state}"
                        f"{': ' + first['error'] if first.get('error') else ''}); see {os.path.join(root, 'summary.md')}")


def fit_root(root: str, args) -> dict:
    """Fits the scaling laws to ROOT/summary.jsonl; writes fit.json and the plots; prints the result."""
    from t5lite.scaling.fit import fit_sweep
    from t5lite.scaling.plots import fit_plots
    rows = summary_lib.read_rows(root)
    loss = args.loss or ("eval_loss" if any(r.get("eval_loss") is not None for r in rows) else "train_loss")
    result = fit_sweep(rows, loss=loss, params=args.params, bootstrap_samples=args.bootstrap, seed=args.bootstrap_seed)
    result["plots"] = fit_plots(result, rows, root)
    with open(os.path.join(root, "fit.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("\n" + describe_fit(result))
    print(f"wrote fit.json, {', '.join(os.path.basename(p) for p in result['plots'].values())} to {root}")
    return result


def _with_interval(value: float, interval, digits: int = 3) -> str:
    return f"{value:.{digits}g} [{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"


def describe_fit(result: dict) -> str:
    """The fit in a few lines: the law with 95% bootstrap intervals, allocation exponents, held-out error."""
    j, ci = result["joint"], result["joint"]["intervals"]
    lines = [(f"L(N, D) = E + A/N^alpha + B/D^beta on {result['num_points']} points ({result['loss']}; "
              f"N = {result['params']}, D = {result['tokens']}; 95% bootstrap intervals over "
              f"{result['bootstrap_samples']} resamples):")]
    lines += [f"  {k:<5} = {_with_interval(j[k], ci[k])}" for k in ("E", "A", "B", "alpha", "beta")]
    lines.append(f"  compute-optimal: N* ~ C^{_with_interval(j['a'], ci['a'])}, D* ~ C^{_with_interval(j['b'], ci['b'])}")
    for name, label in (("params_only", "L(N)"), ("tokens_only", "L(D)")):
        single = result.get(name)
        if single:
            spread = (f"alpha {_with_interval(single['alpha'], single['intervals']['alpha'])}, "
                      if single["intervals"] else "exact: ")
            lines.append(f"  {label} = {single['E']:.3g} + {single['A']:.3g}/{label[2]}^{single['alpha']:.3f}  "
                         f"({spread}{len(single['points'])} points)")
    for h in result["held_out"]:
        lines.append(f"  held out {h['name']}: observed {h['observed']:.4f}, predicted {h['predicted']:.4f} "
                     f"[{h['predicted_interval'][0]:.4f}, {h['predicted_interval'][1]:.4f}], "
                     f"error {100 * h['relative_error']:+.2f}%")
    return "\n".join(lines)


def fit(args) -> None:
    if not os.path.isdir(args.root):
        raise UserError(f"sweep root {args.root} does not exist; give the --root of a finished `t5lite sweep run`")
    fit_root(args.root, args)
