"""A study's results page: the question, the paper's answer, the table over seeds with Welch's p against the
baseline, the finding in plain words, a figure, and what produced it (machine, date, commit, the command).

`t5lite sweep run FILE --root R --results PAGE.md` writes it after the summary (a study file's default page is
docs/results/<study>.md); re-running the same command on finished points rebuilds it without training.
"""

import datetime
import os
import platform
from typing import List, Optional, Sequence

from t5lite.fileio import write_text_atomic
from t5lite.scaling.summary import fmt, markdown

NOISE_P = 0.05  # a difference "exceeds the seeds' noise" when Welch's p is below this ...


def beyond_noise(group: dict, base: dict) -> Optional[bool]:
    """... and |delta| is larger than either variant's seed standard deviation. None: fewer than 2 seeds."""
    compared, p = group["compared"], group.get("p_value")
    if p is None or group.get(f"{compared}_std") is None or base.get(f"{compared}_std") is None:
        return None
    delta = abs(group[f"delta_{compared}"])
    return bool(p < NOISE_P and delta > max(group[f"{compared}_std"], base[f"{compared}_std"]))


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere platform's answer)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def provenance_lines(command: str, now: Optional[datetime.datetime] = None) -> List[str]:
    from t5lite.provenance import code_provenance
    code = code_provenance()
    commit = code.get("commit") or "unknown"
    if code.get("dirty"):
        commit += " (with uncommitted changes)"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return [f"- Machine: {cpu_model()}, {os.cpu_count()} cores",
            f"- Date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Commit: {commit}",
            f"- Command: `{command}`"]


def _variant(group: dict, axis_names: Sequence[str]) -> str:
    return ", ".join(f"{a}={group[a]}" for a in axis_names) + (" (held out)" if group["held_out"] else "")


def _cell(mean, std) -> str:
    return "" if mean is None else fmt(mean) + (f" ± {fmt(std, 2)}" if std is not None else "")


def findings(groups: List[dict], axis_names: Sequence[str], higher_is_better: bool,
             label: Optional[str] = None) -> List[str]:
    """One sentence per variant against the baseline, whichever way it goes."""
    base = next((g for g in groups if g["baseline"]), None)
    if base is None:
        return ["No finished baseline variant: nothing to compare with."]
    compared = base["compared"]
    out = []
    for g in groups:
        if g is base or g.get(f"delta_{compared}") is None:
            continue
        delta = g[f"delta_{compared}"]
        better = (delta > 0) == higher_is_better
        direction = "as good as" if delta == 0 else "better than" if better else "worse than"
        noise = beyond_noise(g, base)
        verdict = {True: "beyond the seeds' noise", False: "within the seeds' noise",
                   None: "too few seeds to tell it from noise"}[noise]
        p = g.get("p_value")
        out.append(f"{_variant(g, axis_names)}: {label or compared} {fmt(g[f'{compared}_mean'])} vs "
                   f"{fmt(base[f'{compared}_mean'])} for the baseline ({'+' if delta >= 0 else ''}{fmt(delta)}, "
                   f"Welch p = {fmt(p, 2) or 'n/a'}): {direction} {_variant(base, axis_names)}, {verdict}.")
    return out


def group_table(groups: List[dict], axis_names: Sequence[str], label: Optional[str] = None) -> str:
    base = next((g for g in groups if g["baseline"]), None)
    compared = groups[0]["compared"]
    fact = "params_trainable" if any(g.get("params_trainable") != g.get("params") for g in groups) else "flops_total"
    rows = []
    for g in groups:
        noise = None if base is None or g is base else beyond_noise(g, base)
        rows.append({"variant": _variant(g, axis_names), "n": g["n"],
                     "value": _cell(g[f"{compared}_mean"], g[f"{compared}_std"]),
                     "delta": "baseline" if g["baseline"] else fmt(g.get(f"delta_{compared}")),
                     "p": g.get("p_value"), "noise": "" if g is base else {True: "yes", False: "no", None: "n/a"}[noise],
                     "loss": _cell(g.get("eval_loss_mean"), g.get("eval_loss_std")) if compared != "eval_loss" else
                     _cell(g.get("train_loss_mean"), g.get("train_loss_std")), "fact": g.get(fact)})
    other = "eval loss" if compared != "eval_loss" else "train loss"
    fact_header = "trainable params" if fact == "params_trainable" else "training FLOPs (all stages)"
    return markdown(rows, [("variant", "variant"), ("n", "seeds"), ("value", f"{label or compared} (mean ± std)"),
                           ("delta", "Δ vs baseline"), ("p", "Welch p"), ("noise", "beyond noise"),
                           ("loss", f"{other} (mean ± std)"), ("fact", fact_header)])


def write_page(path: str, *, study: dict, command: str, rows: List[dict], groups: List[dict],
               axis_names: Sequence[str], higher_is_better: bool = False, figure: Optional[str] = None,
               fit_text: Optional[str] = None, label: Optional[str] = None) -> str:
    """Writes the Markdown page to `path` (atomically); returns its text. `label` names the compared value (a
    study's score: its metric and tasks)."""
    name = study.get("name") or os.path.splitext(os.path.basename(path))[0]
    lines = [f"# Study: {name}", ""]
    if study.get("question"):
        lines += [f"**Question.** {study['question']}", ""]
    if study.get("paper"):
        lines += [f"**The paper's answer.** {study['paper']}", ""]
    done = sum(r["status"] == "done" for r in rows)
    lines += ["## Finding", "", f"{done} of {len(rows)} points finished."]
    if fit_text:
        lines += ["", "```", fit_text, "```"]
    elif groups:
        lines += [""] + [f"- {s}" for s in findings(groups, axis_names, higher_is_better, label)]
        lines += ["", "## Over seeds", "", group_table(groups, axis_names, label), "",
                  f"A difference is *beyond noise* when Welch's p < {NOISE_P} and it is larger than both variants' "
                  "standard deviation over seeds."]
    if figure:
        lines += ["", f"![{name}]({os.path.relpath(figure, os.path.dirname(os.path.abspath(path)))})"]
    point_rows = [{**r, "wall_s": None if r.get("wall_s") is None else round(r["wall_s"])} for r in rows]
    metric_columns = [(k, k) for k in dict.fromkeys(k for r in rows for k in r if k.startswith(("score", "task/")))]
    lines += ["", "## Points", "", markdown(point_rows, [("name", "point"), ("status", "status"), *metric_columns,
                                                          ("eval_loss", "eval loss"), ("train_loss", "train loss"),
                                                          ("flops_total", "FLOPs"), ("wall_s", "wall s"),
                                                          ("error", "error")])]
    lines += ["", "## Reproduce", ""] + provenance_lines(command)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)
    return text
