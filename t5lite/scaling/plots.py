"""Figures of a sweep: loss vs N and vs D with the fitted laws, iso-loss contours with the compute-optimal
frontier, and ablation bars. matplotlib `Figure` objects rendered with Agg: no pyplot global state.
"""

import os
from typing import Dict, List, Sequence

import numpy as np

from t5lite.scaling.fit import PowerLaw, compute_optimal


def _figure(size=(7, 4.5)):
    from matplotlib.figure import Figure
    return Figure(figsize=size)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def law(d: dict) -> PowerLaw:
    """A PowerLaw back from its fit.json entry."""
    two = "B" in d
    return PowerLaw(E=d["E"], scales=(d["A"], d["B"]) if two else (d["A"],),
                    exponents=(d["alpha"], d["beta"]) if two else (d["alpha"],))


def _eng(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def loss_vs(fit: dict, rows: Sequence[dict], along: str, out_png: str) -> str:
    """Loss against N (along='params') or D (along='tokens'): one colour per value of the other
    variable, the joint fit's curve through each, the one-variable fit dashed, held-out points as stars."""
    key, other = (fit["params"], fit["tokens"]) if along == "params" else (fit["tokens"], fit["params"])
    joint, loss = law(fit["joint"]), fit["loss"]
    rows = [r for r in rows if r.get("status") == "done" and r.get(loss) is not None]
    fig = _figure()
    ax = fig.add_subplot()
    xs = np.array([r[key] for r in rows], np.float64)
    grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
    levels = sorted({r[other] for r in rows if not r.get("held_out")})
    for level, colour in zip(levels, _colours(len(levels))):
        pts = [r for r in rows if r[other] == level and not r.get("held_out")]
        ax.scatter([r[key] for r in pts], [r[loss] for r in pts], color=colour, s=22, zorder=3)
        args = (grid, level) if along == "params" else (level, grid)
        ax.plot(grid, joint.predict(*args), color=colour, lw=1.2,
                label=f"{'D' if along == 'params' else 'N'} = {_eng(level)}")
    single = fit.get("params_only" if along == "params" else "tokens_only")
    if single:
        ax.plot(grid, law(single).predict(grid), color="0.4", ls="--", lw=1,
                label=f"L({'N' if along == 'params' else 'D'}) = {single['E']:.3g} + {single['A']:.3g}/"
                      f"{'N' if along == 'params' else 'D'}^{single['alpha']:.3f}")
    for h in fit["held_out"]:
        ax.scatter([h[along]], [h["observed"]], marker="*", s=160, color="crimson", zorder=4,
                   label=f"held out: observed {h['observed']:.3f}")
        ax.scatter([h[along]], [h["predicted"]], marker="x", s=70, color="crimson", zorder=4,
                   label=f"held out: predicted {h['predicted']:.3f} ({100 * h['relative_error']:+.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel(("parameters N (" + key.replace("params_", "").replace("params", "total") + ")")
                  if along == "params" else "tokens seen D")
    ax.set_ylabel(loss.replace("_", " "))
    ax.set_title(_law_title(fit["joint"]), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out_png)


def _colours(n: int) -> List:
    from matplotlib import colormaps
    return [colormaps["viridis"](0.85 * i / max(1, n - 1)) for i in range(n)]


def _law_title(j: dict) -> str:
    return (f"L(N, D) = {j['E']:.3g} + {j['A']:.3g}/N^{j['alpha']:.3f} + {j['B']:.3g}/D^{j['beta']:.3f}"
            f"   (Huber on log L, {j['num_points']} points)")


def isoloss(fit: dict, rows: Sequence[dict], out_png: str) -> str:
    """Contours of the fitted L over (N, D), iso-FLOP lines C = 6ND, the compute-optimal frontier, the points."""
    joint = law(fit["joint"])
    done = [r for r in rows if r.get("status") == "done" and r.get(fit["loss"]) is not None]
    n = np.array([r[fit["params"]] for r in done], np.float64)
    d = np.array([r[fit["tokens"]] for r in done], np.float64)
    ns = np.geomspace(n.min() / 4, n.max() * 30, 160)
    ds = np.geomspace(d.min() / 4, d.max() * 30, 160)
    grid_n, grid_d = np.meshgrid(ns, ds)
    fig = _figure((7, 5.5))
    ax = fig.add_subplot()
    contours = ax.contour(grid_n, grid_d, joint.predict(grid_n, grid_d), levels=12, cmap="viridis_r", linewidths=1)
    ax.clabel(contours, fontsize=7, fmt="%.2f")
    budgets = np.array([o["flops"] for o in fit["compute_optimal"]])
    for c in budgets:
        ax.plot(ns, c / (6 * ns), color="0.6", lw=0.7, ls=":")
    frontier_c = np.geomspace(6 * ns.min() * ds.min(), 6 * ns.max() * ds.max(), 200)
    n_opt, d_opt = compute_optimal(joint, frontier_c)
    inside = (n_opt >= ns.min()) & (n_opt <= ns.max()) & (d_opt >= ds.min()) & (d_opt <= ds.max())
    ax.plot(n_opt[inside], d_opt[inside], color="crimson", lw=2,
            label=f"compute-optimal: N* ∝ C^{fit['joint']['a']:.2f}, D* ∝ C^{fit['joint']['b']:.2f}")
    held = np.array([bool(r.get("held_out")) for r in done])
    ax.scatter(n[~held], d[~held], color="k", s=16, zorder=3, label="sweep points (fitted)")
    if held.any():
        ax.scatter(n[held], d[held], marker="*", color="crimson", s=150, zorder=4, label="held out")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(ns.min(), ns.max())
    ax.set_ylim(ds.min(), ds.max())
    ax.set_xlabel(f"parameters N ({fit['params']})")
    ax.set_ylabel("tokens D")
    ax.set_title("iso-loss contours of the fitted L(N, D); dotted: C = 6ND at powers of ten", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, out_png)


def ablation_bars(groups: Sequence[dict], axis_names: Sequence[str], out_png: str) -> str:
    """One bar per variant: mean of the compared loss over seeds, error bar one standard deviation,
    Welch's p against the baseline above each bar."""
    compared = groups[0]["compared"]
    fig = _figure((max(5, 1.1 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    labels = ["\n".join(str(g[a]) for a in axis_names) + ("\n(held out)" if g["held_out"] else "") for g in groups]
    means = np.array([g[f"{compared}_mean"] for g in groups], np.float64)
    stds = np.array([g[f"{compared}_std"] or 0.0 for g in groups], np.float64)
    colours = ["0.55" if g["baseline"] else "tab:blue" for g in groups]
    ax.bar(range(len(groups)), means, yerr=stds, color=colours, capsize=4)
    low = np.nanmin(means - stds)
    high = np.nanmax(means + stds)
    pad = max(high - low, 1e-3)
    ax.set_ylim(low - 0.6 * pad, high + 0.5 * pad)  # differences are small next to the loss itself
    for i, g in enumerate(groups):
        text = "baseline" if g["baseline"] else ("" if g["p_value"] is None else f"p={g['p_value']:.2g}")
        ax.text(i, means[i] + stds[i] + 0.05 * pad, f"{text}\nn={g['n']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"{compared.replace('_', ' ')} (mean ± std over seeds)")
    ax.set_title(", ".join(axis_names) + ": Welch's t-test against the baseline (grey)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_png)


def fit_plots(fit: dict, rows: Sequence[dict], root: str) -> Dict[str, str]:
    """loss_vs_params.png, loss_vs_tokens.png and isoloss.png in root."""
    return {"loss_vs_params": loss_vs(fit, rows, "params", os.path.join(root, "loss_vs_params.png")),
            "loss_vs_tokens": loss_vs(fit, rows, "tokens", os.path.join(root, "loss_vs_tokens.png")),
            "isoloss": isoloss(fit, rows, os.path.join(root, "isoloss.png"))}
