"""The sweep's results: one row per point, rows grouped over seeds, ablation deltas with Welch's t-test.

Written to ROOT as summary.csv / summary.jsonl (per point), groups.csv / groups.jsonl (per
variant: the points that differ only in seed) and summary.md (both tables, as printed).
Per point: its axis values, seed, status, final train loss, held-out eval loss and accuracy
(the trainer's last evaluation on the task's validation split), task metrics (`task/...`,
with --task_metrics), parameters N (total and non-embedding), tokens seen D (input + target
positions of every step: steps x batch x (input_length + target_length)), target tokens,
training FLOPs C (monitor.model_flops_per_step x steps) and wall time.
"""

import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from t5lite.scaling.sweep import SCORE_FILE, STATUS_FILE, TASK_METRICS_FILE, Plan, finished, metric_of, read_json

FACT_COLUMNS = ("params", "params_non_embedding", "params_trainable", "tokens", "target_tokens", "flops",
                "flops_total")
SUMMARY, GROUPS = "summary", "groups"


def _last(metrics_path: str, key: str) -> Tuple[Optional[int], Optional[float]]:
    """(step, value) of the last logged `key` in a metrics.jsonl (a resumed run's repeated step keeps its last)."""
    from t5lite.train.monitor import read_metrics
    if not os.path.isfile(metrics_path):
        return None, None
    steps, values = read_metrics(metrics_path, key)
    return (steps[-1], values[-1]) if steps else (None, None)


def point_row(plan: Plan, score: Optional[dict] = None) -> dict:
    """Everything known about one point, read from its run directory (a multi-stage point: its last stage's,
    with FLOPs and wall time summed over its stages, and `score`: the mean of the score's metric over its tasks)."""
    p = plan.point
    status = read_json(os.path.join(plan.model_dir, STATUS_FILE)) or {}
    state = "done" if finished(plan) else status.get("status", "failed" if plan.error else "not run")
    metrics = os.path.join(plan.model_dir, "metrics.jsonl")
    step, train_loss = _last(metrics, "loss")
    _, eval_loss = _last(metrics, "eval/loss")
    _, eval_accuracy = _last(metrics, "eval/accuracy")
    task = read_json(os.path.join(plan.model_dir, TASK_METRICS_FILE)) or {}
    row = {"name": p.name, **dict(p.values), "seed": p.seed, "held_out": p.held_out, "status": state, "step": step,
           "train_loss": train_loss, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy,
           **{f"task/{k}": v for k, v in task.items() if isinstance(v, (int, float)) and k != "num_examples"},
           **{k: plan.facts.get(k) for k in FACT_COLUMNS}, "wall_s": status.get("wall_s"),
           "error": plan.error or (status.get("error") if state != "done" else
                                   status.get("task_metrics_error") or status.get("score_error")),
           "model_dir": plan.model_dir}
    runs = (*plan.upstream, plan)
    row["flops_total"] = sum(r.facts.get("flops") or 0 for r in runs) or None
    if plan.upstream:
        walls = [(read_json(os.path.join(r.model_dir, STATUS_FILE)) or {}).get("wall_s") for r in runs]
        row["wall_s"] = sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None
    if score:
        scored = read_json(os.path.join(plan.model_dir, SCORE_FILE)) or {}
        values = {t: scored[t].get(metric_of(score, t)) for t in score["tasks"] if t in scored}
        row.update({f"score/{t}": v for t, v in values.items()})
        complete = state == "done" and len(values) == len(score["tasks"])
        row["score"] = float(np.mean(list(values.values()))) if complete else None
    return row


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------

def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """(t, degrees of freedom, two-sided p) of Welch's unequal-variance t-test of mean(a) - mean(b).

    t = (m_a - m_b) / sqrt(v_a/n_a + v_b/n_b) with sample variances v; Welch-Satterthwaite
    df = (v_a/n_a + v_b/n_b)^2 / ((v_a/n_a)^2/(n_a-1) + (v_b/n_b)^2/(n_b-1)); p = 2 P(T_df > |t|).
    NaN when a group has fewer than two values or both have zero variance.
    """
    from scipy.special import stdtr
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan, math.nan
    sa, sb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if sa + sb == 0:
        return math.nan, math.nan, math.nan
    t = (a.mean() - b.mean()) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa ** 2 / (a.size - 1) + sb ** 2 / (b.size - 1))
    return float(t), float(df), float(2 * stdtr(df, -abs(t)))


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def group_rows(rows: List[dict], axis_names: Sequence[str], baseline: Sequence[Tuple[str, str]],
               compared: Optional[str] = None) -> List[dict]:
    """Finished rows grouped by their axis values (over seeds): n, mean and std of each metric, and
    each variant's difference to the baseline variant in the compared value with Welch's p-value.

    The compared value is `compared` when given (a study's score), else the held-out eval loss when the
    points have one, else the final train loss.
    """
    done = [r for r in rows if r["status"] == "done"]
    metric_keys = ["train_loss", "eval_loss", "eval_accuracy"] + sorted({k for r in done for k in r if
                                                                         k.startswith(("task/", "score"))})
    compared = compared or ("eval_loss" if any(r.get("eval_loss") is not None for r in done) else "train_loss")
    groups: Dict[tuple, List[dict]] = {}
    for r in done:
        groups.setdefault(tuple(r[a] for a in axis_names) + (r["held_out"],), []).append(r)
    base_key = tuple(label for _, label in baseline)
    base = next((g for k, g in groups.items() if k[:-1] == base_key and not k[-1]), None)
    out = []
    for key, members in groups.items():
        row = {**dict(zip(axis_names, key)), "held_out": key[-1], "n": len(members),
               "seeds": " ".join(str(m["seed"]) for m in members), **{k: members[0][k] for k in FACT_COLUMNS}}
        for k in metric_keys:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([m.get(k) for m in members])
        row["compared"] = compared
        row[f"delta_{compared}"] = row["p_value"] = None
        if base is not None:
            values, base_values = ([m[compared] for m in g if m.get(compared) is not None] for g in (members, base))
            if values and base_values:
                row[f"delta_{compared}"] = float(np.mean(values) - np.mean(base_values))
                row["p_value"] = None if members is base else _finite(welch_t_test(values, base_values)[2])
        row["baseline"] = members is base
        out.append(row)
    return out


def _finite(x: float) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Tables and files.
# ---------------------------------------------------------------------------------------------

def fmt(x, digits: int = 4) -> str:
    """Table cells: '' for missing, integers plain below 10^5, large numbers as 1.23e+07, floats to `digits`."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, (int, float)) and abs(x) >= 1e5:
        return f"{x:.3g}"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(rows: List[dict], columns: Sequence[Tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, header) columns."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)).replace("|", "/") for k, _ in columns) + " |")
    return "\n".join(lines)


def _plus_minus(mean, std) -> str:
    return "" if mean is None else fmt(mean) + (f" ± {fmt(std, 2)}" if std is not None else "")


def tables(rows: List[dict], groups: List[dict], axis_names: Sequence[str]) -> str:
    """The per-point table and, when some variant ran with several seeds, the over-seeds table, as Markdown."""
    point_columns = [("name", "point"), ("status", "status"), ("train_loss", "train loss"),
                     ("eval_loss", "eval loss"), ("params_non_embedding", "N (non-emb.)"), ("params", "N (total)"),
                     ("tokens", "D (tokens)"), ("flops", "C (FLOPs)"), ("wall_s", "wall s"), ("error", "error")]
    point_columns[4:4] = [(k, k) for k in dict.fromkeys(k for r in rows for k in r if k.startswith(("task/", "score")))]
    text = markdown([{**r, "wall_s": None if r.get("wall_s") is None else round(r["wall_s"])} for r in rows],
                    point_columns)
    if not any(g["n"] > 1 for g in groups):  # one seed per variant: the per-point table says it all
        return text
    compared = groups[0]["compared"]
    display = []
    for g in groups:
        display.append({**g, "variant": ", ".join(f"{a}={g[a]}" for a in axis_names) + (" (held out)" if g["held_out"]
                                                                                          else ""),
                        "loss": _plus_minus(g[f"{compared}_mean"], g[f"{compared}_std"]),
                        "delta": "baseline" if g["baseline"] else fmt(g[f"delta_{compared}"]),
                        **{f"{k} ": _plus_minus(g[f"{k}_mean"], g[f"{k}_std"]) for k in _task_keys(g)}})
    columns = [("variant", "variant"), ("n", "seeds"), ("loss", compared.replace("_", " ") + " (mean ± std)"),
               ("delta", "Δ vs baseline"), ("p_value", "Welch p")]
    columns += [(f"{k} ", k) for k in _task_keys(groups[0])]
    return text + "\n\n" + markdown(display, columns)


def _task_keys(group: dict) -> List[str]:
    return [k[:-len("_mean")] for k in group if k.startswith("task/") and k.endswith("_mean")]


def _write_rows(path_stem: str, rows: List[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path_stem + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: _finite(v) if isinstance(v, float) else v for k, v in r.items()}) + "\n")
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(root: str, rows: List[dict], groups: List[dict], axis_names: Sequence[str]) -> str:
    """Writes summary.{csv,jsonl,md} and groups.{csv,jsonl} to root; returns the Markdown tables."""
    _write_rows(os.path.join(root, SUMMARY), rows)
    _write_rows(os.path.join(root, GROUPS), groups)
    text = tables(rows, groups, axis_names)
    with open(os.path.join(root, SUMMARY + ".md"), "w") as f:
        f.write(text + "\n")
    return text


def read_rows(root: str) -> List[dict]:
    path = os.path.join(root, SUMMARY + ".jsonl")
    if not os.path.isfile(path):
        from t5lite.errors import UserError
        raise UserError(f"{path} not found; run `t5lite sweep run` (or `t5lite sweep summary`) for this root first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
