"""`make demo`: what is T5 pre-training for? Pre-train once, then fine-tune with and without it, on 2 CPU cores.

1. pre-train a small T5 v1.1 with span corruption on the shipped English + Spanish Bible text
   (experiments/demo/pretrain.gin; train verses only),
2. fine-tune it on English -> Spanish with few labelled pairs: 2,000 of the ~30k train verses drawn
   with the seed (experiments/demo/finetune_en_es.gin), once per learning rate of a small grid,
3. the same runs from random weights (experiments/demo/finetune_en_es_scratch.gin): same subset,
   data order, steps and grid,
4. for each arm, keep the learning rate with the best chrF on the validation split (searched with the
   first seed; the other seeds reuse it), then decode held-out test verses (greedy) with each seed's
   run at that rate: chrF, BLEU, reference perplexity,
5. write runs/demo/{results.md, results.json, loss_curves.png, finetune_vs_scratch.png}.

Every stage goes through the same gin path as `t5lite train` (gin_utils.parse, then the
gin-configured `train`), so each model_dir is an ordinary run. A finished stage (and a finished
evaluation) is skipped, so an interrupted demo continues where it stopped; `--fresh` starts over.
`make demo-curve` (t5lite/demos/curve.py, same flags) repeats the comparison at several fine-tuning set sizes.
`--quick` runs everything on experiments/models/tiny.gin for a few steps: a smoke test, its numbers mean nothing.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

from t5lite.errors import UserError

TASK = "bible_translate_en_es"
SOURCE_PREFIX = "translate English to Spanish: "  # the task's input prefix; the copy baseline strips it
PRETRAIN_GIN = "demo/pretrain.gin"
ARMS = (("pretrained", "demo/finetune_en_es.gin", True),  # table label, run file, starts from pretrain
        ("from scratch", "demo/finetune_en_es_scratch.gin", False))
OUTPUTS = ("results.md", "results.json", "loss_curves.png", "finetune_vs_scratch.png")
CURVE_OUTPUTS = ("curve.md", "curve.json", "curve.png")  # make demo-curve's (curve.py), removed by --fresh too
QUICK_STEPS = {"pretrain": 30, "finetune": 6}
TIMES_FILE = "demo_stage.json"  # per model_dir: how long the stage took, kept for re-runs
REGIME = ("Regime: {size} labelled pairs ({share} of the {total} parallel train verses, drawn with the seed). "
          "Pre-training pays most where labelled data is scarce (T5 found its gains marginal "
          "only on WMT En-Fr, its largest task); `make demo-curve` measures how the gap changes with the "
          "number of pairs. The test verses are never trained on, nor used to choose settings.")


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def _size(text: str) -> int | None:
    return None if text == "all" else int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m t5lite.demos.demo", description="What is T5 pre-training for? Pre-trains a "
                                "small T5 on the shipped Bible text, fine-tunes it on 2,000 English -> Spanish verse "
                                "pairs, trains the same model from scratch with the same recipe search, and compares "
                                "chrF / BLEU / perplexity on held-out verses (~15 min on 2 CPU cores).")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps: a smoke test of every stage")
    p.add_argument("--fresh", action="store_true",
                   help="delete the previous demo runs in --out first (otherwise finished stages are skipped)")
    p.add_argument("--train_size", type=_size, default=2000, help="labelled pairs to fine-tune on ('all': every one)")
    p.add_argument("--seeds", type=_csv(int), default=(0, 1), help="fine-tuning seeds: subset, data order, init")
    p.add_argument("--learning_rates", type=_csv(float), default=(0.003, 0.01),
                   help="the grid each arm searches (best on the validation split)")
    p.add_argument("--search_every_seed", action="store_true",
                   help="search the grid on every seed (default: on the first; the others reuse each arm's choice)")
    p.add_argument("--pretrain_gin", default=PRETRAIN_GIN,
                   help="pre-training run file under experiments/ (e.g. ablations/objective_ul2.gin)")
    p.add_argument("--pretrain_set", action="append", default=[], metavar="NAME=VALUE",
                   help="a gin binding for the pre-training run (repeatable), e.g. TRAIN_STEPS=600")
    p.add_argument("--finetune_set", action="append", default=[], metavar="NAME=VALUE",
                   help="a gin binding for every fine-tuning run of both arms (repeatable), e.g. train.optimizer=adamw")
    p.add_argument("--curve_sizes", type=_csv(_size), default=(500, 2000, 8000, None),
                   help="make demo-curve: fine-tuning set sizes ('all' for every pair)")
    p.add_argument("--val_examples", type=int, default=None, help="validation verses decoded to choose (default 100)")
    p.add_argument("--eval_examples", type=int, default=None, help="test verses to decode (default 200; 16 quick)")
    p.add_argument("--eval_batch_size", type=int, default=50, help="decoding batch size")
    p.add_argument("--input_length", type=int, default=128, help="evaluation inputs are padded/truncated to this")
    p.add_argument("--max_decode_length", type=int, default=None, help="default 96 (covers every test target; 16 quick)")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    args.val_examples = args.val_examples or (8 if args.quick else 100)
    args.eval_examples = args.eval_examples or (16 if args.quick else 200)
    args.max_decode_length = args.max_decode_length or (16 if args.quick else 96)
    for name in ("val_examples", "eval_examples", "eval_batch_size", "input_length", "max_decode_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer")
    if any(size is not None and size < 1 for size in (args.train_size, *args.curve_sizes)):
        p.error("--train_size and --curve_sizes take positive numbers of pairs or 'all'")
    if not args.seeds or not args.learning_rates or any(lr <= 0 for lr in args.learning_rates):
        p.error("--seeds and --learning_rates need at least one value; learning rates must be positive")
    return args


# --- training stages -----------------------------------------------------------------------------


def _finished(model_dir: str, steps: int) -> bool:
    """orbax renames a step directory into place only once it is complete."""
    return os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps)))


def run_stage(name: str, gin_file: str, bindings: Sequence[str], out: str, quick: bool) -> dict:
    """Trains one stage exactly like `t5lite train --gin_file=... --model_dir=out/name --gin.B ...`
    (skipped when its final checkpoint exists) -> {stage, model_dir, steps, wall_s, final_loss, ...}."""
    import gin

    from t5lite import gin_utils
    from t5lite.train import trainer
    files = [os.path.join(gin_utils.EXPERIMENTS_DIR, gin_file)]
    if quick:
        files.append(os.path.join(gin_utils.EXPERIMENTS_DIR, "models/tiny.gin"))
    model_dir = os.path.join(out, name)
    gin_utils.parse(files, list(bindings), model_dir)
    config_text = gin_utils.config_text()
    steps = gin.query_parameter("%TRAIN_STEPS")
    times_path = os.path.join(model_dir, TIMES_FILE)
    saved_config = os.path.join(model_dir, "config.gin")
    if os.path.isdir(os.path.join(model_dir, "checkpoints")) and os.path.isfile(saved_config):
        with open(saved_config) as f:
            if f.read() != config_text:
                raise UserError(f"{model_dir} holds a run with another configuration (the gin files changed "
                                "since); rerun with --fresh (make demo DEMO_ARGS=--fresh) to start over")
    if _finished(model_dir, steps) and os.path.isfile(times_path):
        with open(times_path) as f:
            record = json.load(f)
        print(f"== {name}: already trained ({steps} steps in {record['wall_s']:.0f} s), skipping", flush=True)
        return record
    print(f"== {name}: {steps} steps ({' + '.join(os.path.relpath(f) for f in files)}"
          f"{''.join(' --gin.' + b for b in bindings)})", flush=True)
    start = time.perf_counter()
    metrics = trainer.train(gin_utils.train_config(), operative_gin=config_text,
                            write_configs=gin_utils.config_writer(config_text))
    wall = time.perf_counter() - start
    record = {"stage": name, "gin_file": gin_file, "bindings": list(bindings), "model_dir": model_dir,
              "steps": steps, "wall_s": wall, "final_loss": (metrics or {}).get("loss")}
    if not _finished(model_dir, steps):  # e.g. SIGTERM: the trainer saved and returned early
        raise UserError(f"stage {name} stopped before step {steps}; run the demo again to continue")
    with open(times_path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"== {name}: {steps} steps in {wall:.0f} s, final loss {_fmt(record['final_loss'], 3)}", flush=True)
    return record


def pretrain(args) -> dict:
    quick = [f"TRAIN_STEPS={QUICK_STEPS['pretrain']}"] if args.quick else []
    return run_stage("pretrain", args.pretrain_gin, [*quick, *args.pretrain_set], args.out, args.quick)


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(model_dir: str, split: str, max_examples: int, args) -> dict:
    """Greedy-decodes the first `max_examples` verses of `split` -> {results, records, wall_s}; kept in
    model_dir, so a re-run with the same settings reads it back instead of decoding again."""
    settings = {"split": split, "max_examples": max_examples, "input_length": args.input_length,
                "max_decode_length": args.max_decode_length, "method": "greedy"}
    path = os.path.join(model_dir, f"demo_eval_{split}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            return saved
    from t5lite.train.load import load_for_inference
    from t5lite.data import tasks
    from t5lite.infer.evaluate import evaluate_task
    start = time.perf_counter()
    config, params, vocab, _ = load_for_inference(model_dir)
    results, records = evaluate_task(config, params, tasks.get(TASK), vocab, split=split, max_examples=max_examples,
                                     batch_size=args.eval_batch_size, input_length=args.input_length,
                                     max_decode_length=args.max_decode_length, method="greedy")
    saved = {"settings": settings, "results": results, "records": records, "wall_s": time.perf_counter() - start}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, ensure_ascii=False)
    return saved


def finetune_name(size: int | None, label: str, seed: int, lr: float) -> str:
    arm = "pretrained" if label == "pretrained" else "scratch"
    return f"finetune/n{size or 'all'}/{arm}_seed{seed}_lr{lr:g}"


def _quick_bindings(args) -> list[str]:
    return [f"TRAIN_STEPS={QUICK_STEPS['finetune']}"] if args.quick else []


def tune_and_test(size: int | None, label: str, seed: int, args, learning_rates: Sequence[float],
                  extra_bindings: Sequence[str] = ()) -> dict:
    """One arm, one seed: fine-tune at every learning rate, keep the best validation chrF (ties: the
    first), decode the test verses with it. Selection never sees the test split."""
    gin_file, from_pretrain = next((g, p) for name, g, p in ARMS if name == label)
    runs = []
    for lr in learning_rates:
        bindings = [f"RANDOM_SEED={seed}", f"train.learning_rate={lr}", f"train_subset_task.size={size}",
                    *_quick_bindings(args), *extra_bindings, *args.finetune_set]
        if from_pretrain:
            bindings.append(f"INITIAL_CHECKPOINT_PATH='{os.path.join(args.out, 'pretrain')}'")
        stage = run_stage(finetune_name(size, label, seed, lr), gin_file, bindings, args.out, args.quick)
        run = {"learning_rate": lr, "stage": stage, "validation": None, "val_wall_s": 0.0}
        if len(learning_rates) > 1:  # with one rate there is nothing to choose: no validation decoding
            val = evaluate(stage["model_dir"], "validation", args.val_examples, args)
            print(f"   {label}, seed {seed}, lr {lr:g}: validation chrF {_fmt(val['results']['chrf'])}", flush=True)
            run.update(validation=val["results"], val_wall_s=val["wall_s"])
        runs.append(run)
    best = max(runs, key=lambda r: r["validation"]["chrf"] if r["validation"] else 0.0)  # the first of equals
    test = evaluate(best["stage"]["model_dir"], "test", args.eval_examples, args)
    return {"arm": label, "seed": seed, "size": size, "learning_rate": best["learning_rate"],
            "model_dir": best["stage"]["model_dir"], "grid": runs, "test": test["results"],
            "test_records": test["records"], "test_wall_s": test["wall_s"]}


def compare(size: int | None, args, chosen: dict[tuple, float] | None = None,
            extra_bindings: Sequence[str] = ()) -> dict[str, list[dict]]:
    """{arm label: [tune_and_test per seed]}, seeds outermost so seed 0's pair finishes first. Each arm
    searches args.learning_rates on the first seed; the other seeds reuse the rate it chose there (or
    search too, with --search_every_seed). chosen[(label, seed)], when given, fixes the rate instead."""
    per_arm = {label: [] for label, _, _ in ARMS}
    for i, seed in enumerate(args.seeds):
        for label, _, _ in ARMS:
            if chosen:
                lrs = [chosen[(label, seed)]]
            elif i > 0 and not args.search_every_seed:
                lrs = [per_arm[label][0]["learning_rate"]]
            else:
                lrs = list(args.learning_rates)
            per_arm[label].append(tune_and_test(size, label, seed, args, lrs, extra_bindings))
    return per_arm


# --- summary and report ------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict:
    """Mean, min and max over seeds."""
    values = [float(v) for v in values]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def summarize(per_arm: dict[str, list[dict]]) -> dict:
    """Per arm: each metric's mean / min / max over seeds and the chosen learning rates; the chrF gain
    of pre-training (difference of means) and whether every pretrained seed beats every scratch seed, in chrF
    (higher) and in reference perplexity (lower)."""
    arms = {label: {**{m: spread([r["test"][m] for r in runs]) for m in ("chrf", "bleu", "perplexity")},
                    "learning_rates": [r["learning_rate"] for r in runs], "seeds": [r["seed"] for r in runs],
                    "train_wall_s": sum(g["stage"]["wall_s"] for r in runs for g in r["grid"])}
            for label, runs in per_arm.items()}
    pre, scratch = arms["pretrained"], arms["from scratch"]
    return {"arms": arms, "chrf_gain": pre["chrf"]["mean"] - scratch["chrf"]["mean"],
            "every_seed_wins": pre["chrf"]["min"] > scratch["chrf"]["max"],
            "every_seed_lower_perplexity": pre["perplexity"]["max"] < scratch["perplexity"]["min"]}


def copy_baseline(records: Sequence[dict]) -> dict:
    """chrF / BLEU of "translating" by copying the English source: the score a model must beat before it
    has translated anything (names and numbers are shared; measured 17.8 chrF on the 200 test verses)."""
    from t5lite import metrics
    targets = [r["target"] for r in records]
    copies = [r["input"].removeprefix(SOURCE_PREFIX) for r in records]
    return {**metrics.chrf(targets, copies), **metrics.bleu(targets, copies)}


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(s: dict, digits: int = 1) -> str:
    return f"{_fmt(s['mean'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"


def results_markdown(results: dict) -> str:
    summary, ev, p = results["summary"], results["eval_settings"], results["pretrain"]
    lines = [results["regime"], "",
             (f"{TASK}, {ev['num_examples']} held-out test verses, greedy decoding; mean over seeds "
             f"{', '.join(map(str, results['seeds']))} (min–max); each arm's learning rate chosen on "
             f"{ev['val_examples']} validation verses from {', '.join(f'{lr:g}' for lr in results['learning_rates'])} "
             f"({results['search']})."), "",
             "| fine-tuned | chrF | BLEU | reference perplexity | learning rate per seed | fine-tune wall time (all runs) |",
             "|---|---:|---:|---:|---|---:|"]
    for label, arm in summary["arms"].items():
        lines.append(f"| {label} | {_cell(arm['chrf'])} | {_cell(arm['bleu'])} | {_cell(arm['perplexity'], 2)} | "
                     f"{', '.join(f'{lr:g}' for lr in arm['learning_rates'])} | {arm['train_wall_s']:.0f} s |")
    base = results["copy_baseline"]
    lines.append(f"| no model: copy the English source | {_fmt(base['chrf'])} | {_fmt(base['bleu'])} | | | |")
    verdict = "yes" if summary["every_seed_wins"] else "no"
    above_floor = ", ".join(f"{label} {'yes' if arm['chrf']['mean'] > base['chrf'] else 'no'}"
                            for label, arm in summary["arms"].items())
    lines += ["", (f"chrF gain from pre-training: {summary['chrf_gain']:+.1f} (mean over seeds); every pretrained "
              f"seed beats every scratch seed: {verdict}; mean chrF above the copy-the-source floor: {above_floor}."), "",
              (f"Pre-training ({p['gin_file']}): {p['steps']} steps in {p['wall_s']:.0f} s (final loss "
              f"{_fmt(p['final_loss'], 3)}), shared by every pretrained fine-tuning run."), "",
              "| stage | steps | train wall time | validation chrF | evaluation wall time |", "|---|---:|---:|---:|---:|",
              f"| pretrain | {p['steps']} | {p['wall_s']:.0f} s | | |"]
    for runs in results["runs"].values():
        for r in runs:
            for g in r["grid"]:
                chosen = " (chosen)" if g["learning_rate"] == r["learning_rate"] else ""
                val = _fmt(g["validation"]["chrf"]) if g["validation"] else ""
                lines.append(f"| {g['stage']['stage']} | {g['stage']['steps']} | {g['stage']['wall_s']:.0f} s | "
                             f"{val}{chosen} | {g['val_wall_s']:.0f} s |")
            lines.append(f"| {r['model_dir']}: test | | | | {r['test_wall_s']:.0f} s |")
    lines += ["", f"Wall time of this invocation (skipped stages cost nothing): {results['total_wall_s']:.0f} s.", ""]
    for i, ex in enumerate(results["examples"], 1):
        lines += [f"Example {i} (seed {results['seeds'][0]})", f"- input:        {ex['input']}",
                  f"- reference:    {ex['reference']}", f"- pretrained:   {ex['pretrained']}",
                  f"- from scratch: {ex['from scratch']}", ""]
    return "\n".join(lines)


def pick_examples(per_arm: dict[str, list[dict]], n: int = 3) -> list[dict]:
    """The first `n` test verses with a short reference (readable), whatever the predictions are (seed 0)."""
    first = {label: runs[0]["test_records"] for label, runs in per_arm.items()}
    records = first["pretrained"]
    picked = [i for i, r in enumerate(records) if len(r["target"]) <= 120][:n] or list(range(min(n, len(records))))
    return [{"input": records[i]["input"], "reference": records[i]["target"],
             **{label: first[label][i]["prediction"] for label in first}} for i in picked]


def plot(out: str, pre: dict, per_arm: dict[str, list[dict]]) -> list[str]:
    """loss_curves.png: pre-training; finetune_vs_scratch.png: each arm's chosen run per seed (fine-tuning's
    120 steps would be a sliver on pre-training's axis)."""
    from t5lite.train.monitor import plot_metrics
    paths = [os.path.join(out, "loss_curves.png"), os.path.join(out, "finetune_vs_scratch.png")]
    chosen = {f"{label}, seed {r['seed']}, lr {r['learning_rate']:g}": os.path.join(r["model_dir"], "metrics.jsonl")
              for label, runs in per_arm.items() for r in runs}
    plot_metrics({f"pre-training ({pre['gin_file']})": os.path.join(pre["model_dir"], "metrics.jsonl")}, paths[0])
    plot_metrics(chosen, paths[1])
    return paths


def clean(out: str) -> None:
    """--fresh: removes only what the demo writes (never the whole --out directory)."""
    for name in ("pretrain", "finetune", ".jax_cache"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in OUTPUTS + CURVE_OUTPUTS:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def regime(size: int | None) -> str:
    from t5lite.data import tasks
    total = tasks.get(TASK).num_examples("train")
    size = total if size is None else size
    return REGIME.format(size=f"{size:,}", share=f"{size / total:.0%}", total=f"{total:,}")


def run(args) -> dict:
    """The demo: pre-train, compare the arms at --train_size, write and print the report."""
    start = time.perf_counter()
    print(regime(args.train_size), flush=True)
    pre = pretrain(args)
    per_arm = compare(args.train_size, args)
    summary = summarize(per_arm)
    results = {
        "task": TASK, "quick": args.quick, "regime": regime(args.train_size), "train_size": args.train_size,
        "seeds": list(args.seeds), "learning_rates": list(args.learning_rates), "pretrain": pre,
        "search": "for every seed" if args.search_every_seed else
                  f"with seed {args.seeds[0]}; the other seeds reuse the arm's choice",
        "summary": summary, "runs": {label: [{k: v for k, v in r.items() if k != "test_records"} for r in runs]
                                     for label, runs in per_arm.items()},
        "eval_settings": {"split": "test", "num_examples": per_arm["pretrained"][0]["test"]["num_examples"],
                          "val_examples": args.val_examples, "method": "greedy", "input_length": args.input_length,
                          "max_decode_length": args.max_decode_length},
        "copy_baseline": copy_baseline(per_arm["pretrained"][0]["test_records"]),
        "examples": pick_examples(per_arm), "plots": plot(args.out, pre, per_arm),
        "total_wall_s": time.perf_counter() - start,  # this invocation (skipped stages cost nothing)
    }
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    text = results_markdown(results)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json, "
          f"{', '.join(os.path.basename(p) for p in results['plots'])}; TensorBoard: tensorboard --logdir {args.out}")
    return results


def use_compilation_cache(out: str) -> None:
    """Every fine-tuning run of one learning rate compiles the same train step: a persistent cache in
    --out compiles it once (measured here: a recompile of a cached function 4.2 s -> 1.2 s)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(out, ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def start(out: str, fresh: bool, clean_out) -> None:
    """What `make demo` and `make cards` do first: quiet logs, `--fresh` (clean_out(out)), the output
    directory and its compilation cache."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fresh:
        clean_out(out)
    os.makedirs(out, exist_ok=True)
    use_compilation_cache(out)


def main(argv=None, body=None) -> int:
    """`make demo` (body = run); `make demo-curve` passes its own body (curve.run) over the same flags."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        start(args.out, args.fresh, clean)
        (body or run)(args)
    except UserError as e:
        print(f"t5lite.demos: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
