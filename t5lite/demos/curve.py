"""`make demo-curve`: chrF of pretrained vs from-scratch fine-tuning at several fine-tuning set sizes.

The demo's comparison (demo.compare) repeated at each size of --curve_sizes, over the demo's
pre-training run. The demo's own size searches the learning-rate grid on validation; the other
sizes reuse the learning rate each arm chose there for the same seed (a fair rule, the same for
both arms, that halves the runs). Larger sets get proportionally more steps (finetune_steps), so each
pair is seen about as often as in the demo, up to MAX_STEP_MULTIPLE times the demo's steps (all ~30k
pairs are then seen less than once). Writes curve.md, curve.json and curve.png next to the demo's results.
"""

import json
import os
import time

import sys

from t5lite.demos import demo

OUTPUTS = demo.CURVE_OUTPUTS
MAX_STEP_MULTIPLE = 4  # sizes above the demo's train for up to 4x the demo's fine-tuning steps


def finetune_steps(size: int | None, demo_size: int, demo_steps: int, total: int) -> int:
    """The demo's steps, scaled with the set size above the demo's (same epochs), capped at MAX_STEP_MULTIPLE x."""
    size = total if size is None else size
    multiple = min(max(size / demo_size, 1.0), MAX_STEP_MULTIPLE)
    return round(demo_steps * multiple)


def _demo_steps(args) -> int:
    import gin

    from t5lite import gin_utils
    if args.quick:
        return demo.QUICK_STEPS["finetune"]
    gin_utils.parse([os.path.join(gin_utils.EXPERIMENTS_DIR, demo.ARMS[0][1])])
    return gin.query_parameter("%TRAIN_STEPS")


def curve_markdown(points: list[dict], machine: str, copy_chrf: float) -> str:
    lines = [(f"chrF and reference perplexity on {points[0]['num_examples']} held-out test verses against the number "
             f"of labelled pairs fine-tuned on; mean over seeds (min–max); copying the English source scores "
             f"{copy_chrf:.1f} chrF. {machine}"), "",
             "| labelled pairs | fine-tune steps | pretrained chrF | from-scratch chrF | chrF gain | every seed wins "
             "(chrF) | pretrained perplexity | from-scratch perplexity | every seed wins (perplexity) |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for p in points:
        summary = p["summary"]
        pre, scratch = summary["arms"]["pretrained"], summary["arms"]["from scratch"]
        lines.append(f"| {p['pairs']:,} | {p['steps']} | {demo._cell(pre['chrf'])} | {demo._cell(scratch['chrf'])} | "
                     f"{summary['chrf_gain']:+.1f} | {'yes' if summary['every_seed_wins'] else 'no'} | "
                     f"{demo._cell(pre['perplexity'])} | {demo._cell(scratch['perplexity'])} | "
                     f"{'yes' if summary['every_seed_lower_perplexity'] else 'no'} |")
    return "\n".join(lines)


def plot_curve(points: list[dict], out_png: str, copy_chrf: float) -> None:
    """Two panels against the number of pairs: test chrF (with the copy-the-source floor) and reference perplexity."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    chrf_ax, ppl_ax = fig.subplots(1, 2)
    sizes = [p["pairs"] for p in points]
    for ax, metric in ((chrf_ax, "chrf"), (ppl_ax, "perplexity")):
        for label, marker in (("pretrained", "o"), ("from scratch", "s")):
            stats = [p["summary"]["arms"][label][metric] for p in points]
            means = [s["mean"] for s in stats]
            err = [[m - s["min"] for m, s in zip(means, stats)], [s["max"] - m for m, s in zip(means, stats)]]
            ax.errorbar(sizes, means, yerr=err, marker=marker, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("labelled en→es verse pairs fine-tuned on")
        ax.grid(alpha=0.3)
    chrf_ax.axhline(copy_chrf, color="gray", linestyle="--", label="no model: copy the English source")
    chrf_ax.set_ylabel("test chrF (higher is better)")
    ppl_ax.set_yscale("log")
    ppl_ax.set_ylabel("test reference perplexity (lower is better)")
    chrf_ax.legend()
    ppl_ax.legend()
    fig.savefig(out_png, dpi=120, bbox_inches="tight")


def run(args) -> list[dict]:
    """The demo at args.train_size (grid search), then every other size with the chosen rates."""
    from t5lite.data import tasks
    start = time.perf_counter()
    total = tasks.get(demo.TASK).num_examples("train")
    demo_size = args.train_size or total
    demo_steps = _demo_steps(args)
    demo.pretrain(args)
    points: dict[int | None, dict] = {}
    per_arm = demo.compare(args.train_size, args)
    copy_chrf = demo.copy_baseline(per_arm["pretrained"][0]["test_records"])["chrf"]  # the test verses of every size
    chosen = {(label, r["seed"]): r["learning_rate"] for label, runs in per_arm.items() for r in runs}
    points[args.train_size] = {"per_arm": per_arm, "steps": demo_steps}
    for size in args.curve_sizes:
        if size == args.train_size:
            continue
        steps = finetune_steps(size, demo_size, demo_steps, total)
        print(f"== curve: {size or total} labelled pairs, {steps} fine-tuning steps", flush=True)
        points[size] = {"per_arm": demo.compare(size, args, chosen, [f"TRAIN_STEPS={steps}"]), "steps": steps}
    rows = []
    for size in sorted(points, key=lambda s: total if s is None else s):
        per_arm = points[size]["per_arm"]
        rows.append({"pairs": total if size is None else size, "steps": points[size]["steps"],
                     "summary": demo.summarize(per_arm),
                     "num_examples": per_arm["pretrained"][0]["test"]["num_examples"],
                     "learning_rates": {label: [r["learning_rate"] for r in runs] for label, runs in per_arm.items()}})
    machine = f"{os.cpu_count()} CPU cores; {time.strftime('%Y-%m-%d')}; this invocation {time.perf_counter() - start:.0f} s."
    text = curve_markdown(rows, machine, copy_chrf)
    with open(os.path.join(args.out, "curve.json"), "w", encoding="utf-8") as f:
        json.dump({"points": rows, "machine": machine, "seeds": list(args.seeds), "copy_chrf": copy_chrf}, f, indent=2)
    with open(os.path.join(args.out, "curve.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot_curve(rows, os.path.join(args.out, "curve.png"), copy_chrf)
    print("\n" + text)
    print(f"wrote {os.path.join(args.out, 'curve.md')}, curve.json, curve.png")
    return rows


if __name__ == "__main__":
    sys.exit(demo.main(body=run))
