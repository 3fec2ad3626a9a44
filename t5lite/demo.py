"""`make demo`: does T5 pre-training help? Pre-train, fine-tune, compare with scratch, on 2 CPU cores.

1. pre-train a small T5 v1.1 with span corruption on the shipped English + Spanish Bible text
   (experiments/demo/pretrain.gin),
2. fine-tune it on English -> Spanish (experiments/demo/finetune_en_es.gin),
3. train the same model on the same task, with the same budget, from random weights
   (experiments/demo/finetune_en_es_scratch.gin),
4. decode held-out verses (test split, greedy) with both and score them with chrF and BLEU,
5. write runs/demo/{results.md, results.json, loss_curves.png, finetune_vs_scratch.png}.

Every stage goes through the same gin path as `t5lite train` (gin_utils.parse, then the
gin-configured `train`), so each model_dir is an ordinary run: TensorBoard logs, metrics.jsonl,
config.gin, checkpoints. A stage whose final checkpoint exists is skipped, so an interrupted
demo continues where it stopped. `--quick` shrinks everything (experiments/models/tiny.gin, a
few steps) into a one-minute smoke test; its numbers mean nothing.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

from t5lite.errors import UserError

TASK = "bible_translate_en_es"
STAGES = (  # name, run file (under experiments/), stage whose model_dir it starts from
    ("pretrain", "demo/pretrain.gin", None),
    ("finetune", "demo/finetune_en_es.gin", "pretrain"),
    ("scratch", "demo/finetune_en_es_scratch.gin", None),
)
ROWS = (("pretrained", "finetune"), ("from scratch", "scratch"))  # table row label, stage
OUTPUTS = ("results.md", "results.json", "loss_curves.png", "finetune_vs_scratch.png")
QUICK_STEPS = {"pretrain": 40, "finetune": 30, "scratch": 30}
TIMES_FILE = "demo_stage.json"  # per model_dir: how long the stage took, kept for re-runs


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m t5lite.demo", description="Does T5 pre-training help? Pre-trains a small "
                                "T5 with span corruption on the shipped Bible text, fine-tunes it on English -> Spanish, "
                                "trains the same model from scratch with the same budget, and compares chrF / BLEU on "
                                "held-out verses (~15 min on 2 CPU cores).")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps: a 1-2 minute smoke test")
    p.add_argument("--fresh", action="store_true",
                   help="delete the previous demo runs in --out first (otherwise finished stages are skipped)")
    p.add_argument("--eval_examples", type=int, default=None, help="test-split examples to decode (default 200; 32 quick)")
    p.add_argument("--eval_batch_size", type=int, default=50, help="decoding batch size")
    p.add_argument("--input_length", type=int, default=128, help="evaluation inputs are padded/truncated to this")
    p.add_argument("--max_decode_length", type=int, default=None, help="default 96 (covers every test target; 32 quick)")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    args.eval_examples = args.eval_examples or (32 if args.quick else 200)
    args.max_decode_length = args.max_decode_length or (32 if args.quick else 96)
    return args


# --- training stages -----------------------------------------------------------------------------


def _stage_bindings(name: str, init: Optional[str], out: str, quick: bool) -> List[str]:
    bindings = [f"INITIAL_CHECKPOINT_PATH={os.path.join(out, init)}"] if init else []
    if quick:
        bindings.append(f"TRAIN_STEPS={QUICK_STEPS[name]}")
    return bindings


def _finished(model_dir: str, steps: int) -> bool:
    """orbax renames a step directory into place only once it is complete."""
    return os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps)))


def run_stage(name: str, gin_file: str, init: Optional[str], out: str, quick: bool) -> dict:
    """Trains one stage exactly like `t5lite train --gin_file=... --model_dir=out/name` (skipped if done)."""
    import gin
    from t5lite import gin_utils
    files = [os.path.join(gin_utils.EXPERIMENTS_DIR, gin_file)]
    if quick:
        files.append(os.path.join(gin_utils.EXPERIMENTS_DIR, "models/tiny.gin"))
    model_dir = os.path.join(out, name)
    gin_utils.parse(files, _stage_bindings(name, init, out, quick), model_dir)
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
    print(f"== {name}: {steps} steps of {gin.query_parameter('%MIXTURE_OR_TASK_NAME')} "
          f"({' + '.join(os.path.relpath(f) for f in files)}) -> {model_dir}", flush=True)
    start = time.perf_counter()
    metrics = gin_utils.train_into(model_dir, config_text)
    wall = time.perf_counter() - start
    record = {"stage": name, "gin_file": gin_file, "model_dir": model_dir, "steps": steps, "wall_s": wall,
              "final_loss": (metrics or {}).get("loss"), "init": os.path.join(out, init) if init else None}
    if not _finished(model_dir, steps):  # e.g. SIGTERM: the trainer saved and returned early
        raise UserError(f"stage {name} stopped before step {steps}; run the demo again to continue")
    with open(times_path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"== {name}: {steps} steps in {wall:.0f} s, final loss {_fmt(record['final_loss'], 3)}", flush=True)
    return record


# --- evaluation and report -----------------------------------------------------------------------


def evaluate(model_dir: str, args) -> (Dict[str, float], List[dict], float):
    """Greedy-decodes the first `eval_examples` test verses -> (metrics, records, seconds)."""
    from t5lite.commands import load_for_inference
    from t5lite.data import tasks
    from t5lite.infer.evaluate import evaluate_task
    start = time.perf_counter()
    config, params, vocab, _ = load_for_inference(model_dir)
    results, records = evaluate_task(config, params, tasks.get(TASK), vocab, split="test",
                                     max_examples=args.eval_examples, batch_size=args.eval_batch_size,
                                     input_length=args.input_length, max_decode_length=args.max_decode_length,
                                     method="greedy")
    return results, records, time.perf_counter() - start


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def results_markdown(results: dict) -> str:
    rows, stages = results["evaluation"], results["stages"]
    ev = results["eval_settings"]
    lines = [f"Fine-tuning {TASK}, {ev['num_examples']} held-out test verses, greedy decoding "
             f"(max {ev['max_decode_length']} tokens).", "",
             "| model | chrF | BLEU | perplexity | fine-tune steps | fine-tune wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, stage in ROWS:
        r, s = rows[label], stages[stage]
        lines.append(f"| {label} | {_fmt(r['chrf'])} | {_fmt(r['bleu'])} | {_fmt(r['perplexity'], 2)} | "
                     f"{s['steps']} | {s['wall_s']:.0f} s |")
    p = stages["pretrain"]
    lines += ["", f"Pre-training: {p['steps']} steps of span corruption in {p['wall_s']:.0f} s "
              f"(final loss {_fmt(p['final_loss'], 3)}). Wall time of this demo run (skipped stages cost nothing): {results['total_wall_s']:.0f} s.", ""]
    for i, ex in enumerate(results["examples"], 1):
        lines += [f"Example {i}", f"- input:        {ex['input']}", f"- reference:    {ex['reference']}",
                  f"- pretrained:   {ex['pretrained']}", f"- from scratch: {ex['from scratch']}", ""]
    return "\n".join(lines)


def _pick_examples(records: Dict[str, List[dict]], n: int = 3) -> List[dict]:
    """The first `n` test verses with a short reference (readable), whatever the predictions are."""
    first = records[ROWS[0][0]]
    picked = [i for i, r in enumerate(first) if len(r["target"]) <= 120][:n] or list(range(min(n, len(first))))
    return [{"input": first[i]["input"], "reference": first[i]["target"],
             **{label: records[label][i]["prediction"] for label, _ in ROWS}} for i in picked]


def _plot(out: str, stages: Dict[str, dict]) -> List[str]:
    from t5lite.train.monitor import plot_metrics
    jsonl = {name: os.path.join(out, name, "metrics.jsonl") for name in stages}
    labels = {"pretrain": "pre-training (span corruption)", "finetune": "fine-tune from pre-trained",
              "scratch": "fine-tune from scratch"}
    paths = [os.path.join(out, "loss_curves.png"), os.path.join(out, "finetune_vs_scratch.png")]
    plot_metrics({labels[name]: path for name, path in jsonl.items()}, paths[0])
    plot_metrics({labels[name]: jsonl[name] for name in ("finetune", "scratch")}, paths[1])
    return paths


def _clean(out: str) -> None:
    """--fresh: removes only what the demo writes (never the whole --out directory)."""
    for name, _, _ in STAGES:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in OUTPUTS:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def run(args) -> dict:
    start = time.perf_counter()
    if args.fresh:
        _clean(args.out)
    os.makedirs(args.out, exist_ok=True)
    stages = {name: run_stage(name, gin_file, init, args.out, args.quick) for name, gin_file, init in STAGES}

    evaluation, records, eval_s = {}, {}, {}
    for label, stage in ROWS:
        print(f"== evaluating {label} ({stages[stage]['model_dir']}) on {args.eval_examples} test verses", flush=True)
        evaluation[label], records[label], eval_s[label] = evaluate(stages[stage]["model_dir"], args)
        evaluation[label]["eval_wall_s"] = eval_s[label]
    pngs = _plot(args.out, stages)
    results = {
        "task": TASK, "quick": args.quick, "stages": stages, "evaluation": evaluation,
        "eval_settings": {"split": "test", "num_examples": evaluation[ROWS[0][0]]["num_examples"],
                          "method": "greedy", "input_length": args.input_length,
                          "max_decode_length": args.max_decode_length},
        "chrf_gain_from_pretraining": evaluation["pretrained"]["chrf"] - evaluation["from scratch"]["chrf"],
        "examples": _pick_examples(records), "plots": pngs,
        "total_wall_s": time.perf_counter() - start,  # this invocation (skipped stages cost nothing)
    }
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    text = results_markdown(results)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n" + text)
    gain = results["chrf_gain_from_pretraining"]
    print(f"chrF of pretrained minus from scratch, same fine-tuning budget: {gain:+.1f}")
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json, {', '.join(os.path.basename(p) for p in pngs)}; "
          f"TensorBoard: tensorboard --logdir {args.out}")
    return results


def main(argv=None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(args)
    except UserError as e:
        print(f"t5lite.demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
