"""`make cards`: one frozen base, three adapter cards, one mixed batch.

1. the base: the small T5 that `make demo` pre-trains (runs/demo/pretrain); when it is missing, the demo's
   own pre-training stage trains it (t5lite.demos.demo.pretrain, skipped when finished),
2. three LoRA cards on it (experiments/cards/*.gin): English -> Spanish, KJV -> WEB modernisation and
   WordNet definitions, each an ordinary card run under runs/cards/<card>/ (its card/ is the card alone),
3. each card against the base on its task's held-out test examples (greedy; the task's metric: chrF for
   the Bible tasks, ROUGE-Lsum for definitions),
4. one mixed batch: test lines of the three tasks, each with its own card, and the same lines with no card
   (the base), decoded in ONE call; printed side by side,
5. runs/cards/{results.md, results.json}.

Stages and evaluations are skipped when finished (demo.run_stage; evaluations are kept per run), so an
interrupted run continues; `--fresh` starts the cards over (never the demo's base). `--quick`: the demo's
tiny smoke-test base and a few steps; its numbers mean nothing.
"""

import argparse
import json
import os
import shutil
import sys
import time

from t5lite.demos import demo
from t5lite.errors import UserError

# name, run file under experiments/, task, headline metric
CARDS = (("es", "cards/en_es.gin", "bible_translate_en_es", "chrf"),
         ("kjv", "cards/kjv_web.gin", "bible_modernize_kjv_web", "chrf"),
         ("define", "cards/wordnet_define.gin", "wordnet_define", "rougeLsum"))
QUICK_STEPS = 6
OUTPUTS = ("results.md", "results.json")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m t5lite.demos.cards", description="Trains three LoRA adapter cards "
                                "on the demo's pre-trained base, scores each against the base on its task, and "
                                "decodes one batch that mixes the three cards and the base (~10 min on 2 CPU cores "
                                "after `make demo`).")
    p.add_argument("--out", default=None, help="run directory (default runs/cards, or runs/cards_quick with --quick)")
    p.add_argument("--demo_out", default=None, help="the demo's run directory, whose pretrain/ is the base "
                   "(default runs/demo, or runs/demo_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the demo's tiny quick base, a few steps: a smoke test")
    p.add_argument("--fresh", action="store_true", help="delete the previous cards in --out first (not the base)")
    p.add_argument("--eval_examples", type=int, default=None, help="test examples per task (default 100; 8 quick)")
    p.add_argument("--mixed_lines", type=int, default=2, help="test lines per card in the mixed batch")
    p.add_argument("--eval_batch_size", type=int, default=50, help="decoding batch size")
    p.add_argument("--input_length", type=int, default=128, help="inputs are padded/truncated to this")
    p.add_argument("--max_decode_length", type=int, default=None, help="default 96 (16 quick)")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/cards_quick" if args.quick else "runs/cards")
    args.demo_out = args.demo_out or ("runs/demo_quick" if args.quick else "runs/demo")
    args.eval_examples = args.eval_examples or (8 if args.quick else 100)
    args.max_decode_length = args.max_decode_length or (16 if args.quick else 96)
    for name in ("eval_examples", "mixed_lines", "eval_batch_size", "input_length", "max_decode_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer")
    return args


# --- stages ----------------------------------------------------------------------------------------


def base_stage(args) -> dict:
    """The demo's pre-training stage, exactly as `make demo` runs it (skipped when it has finished)."""
    return demo.pretrain(demo.parse_args(["--out", args.demo_out, *(["--quick"] if args.quick else [])]))


def card_stage(name: str, gin_file: str, base_dir: str, args) -> dict:
    bindings = [f"INITIAL_CHECKPOINT_PATH='{base_dir}'", *([f"TRAIN_STEPS={QUICK_STEPS}"] if args.quick else [])]
    return demo.run_stage(name, gin_file, bindings, args.out, args.quick)


def _eval_settings(args) -> dict:
    return {"split": "test", "max_examples": args.eval_examples, "input_length": args.input_length,
            "max_decode_length": args.max_decode_length, "method": "greedy"}


def score(path: str, key: dict, task_name: str, base, card, args) -> dict:
    """Greedy-decodes the task's first test examples with the base (+ card) -> {results, records, wall_s};
    kept at `path` and read back while `key` (what was scored, how) is unchanged."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved
    from t5lite.data import tasks
    from t5lite.infer.evaluate import evaluate_task
    from t5lite.model import lora
    config, params, vocab = base
    cards = lora.stack_cards([(card.spec, card.params)], config) if card is not None else None
    start = time.perf_counter()
    results, records = evaluate_task(config, params, tasks.get(task_name), vocab, split="test",
                                     max_examples=args.eval_examples, batch_size=args.eval_batch_size,
                                     input_length=args.input_length, max_decode_length=args.max_decode_length,
                                     method="greedy", cards=cards)
    saved = {"key": key, "results": results, "records": records, "wall_s": time.perf_counter() - start}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, ensure_ascii=False)
    return saved


def mixed_batch(base, cards, args) -> list[dict]:
    """The first --mixed_lines test lines of each card's task, interleaved, each once with its own card and
    once with none, all decoded in one generate call -> [{input, card, task, card_answer, base_answer}]."""
    from t5lite.data import tasks
    from t5lite.infer.evaluate import decode_texts
    from t5lite.model import lora
    config, params, vocab = base
    examples = {task_name: tasks.get(task_name).eval_examples("test", max_examples=args.mixed_lines)
                for _, _, task_name in cards}
    lines = [(examples[task_name][i]["inputs_pretokenized"], name, task_name, number)
             for i in range(args.mixed_lines) for number, (name, _, task_name) in enumerate(cards)
             if i < len(examples[task_name])]
    table = lora.stack_cards([(card.spec, card.params) for _, card, _ in cards], config)
    texts = [text for text, *_ in lines] * 2
    index = [number for *_, number in lines] + [-1] * len(lines)  # the same lines, then the base alone
    records = decode_texts(config, params, vocab, texts, input_length=args.input_length, batch_size=len(texts),
                           max_decode_length=args.max_decode_length, method="greedy", cards=table, card_index=index)
    return [{"input": text, "card": name, "task": task_name, "card_answer": records[i]["output"],
             "base_answer": records[len(lines) + i]["output"]} for i, (text, name, task_name, _) in enumerate(lines)]


# --- report --------------------------------------------------------------------------------------


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def results_markdown(results: dict) -> str:
    base = results["base"]
    lines = [f"Base: {base['model_dir']} ({base['params']:,} parameters, {base['steps']} pre-training steps, frozen). "
             f"Each card scored on the first {results['eval_settings']['max_examples']} test examples of its task, "
             "greedy decoding.", "",
             "| card | task | steps | card params (% of base) | on disk | metric | base | card | gain |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for c in results["cards"]:
        lines.append(f"| {c['name']} | {c['task']} | {c['steps']} | {c['params']:,} ({100 * c['params'] / base['params']:.1f} %) "
                     f"| {c['bytes_on_disk'] / 1024:.0f} KiB | {c['metric']} | {_fmt(c['base'][c['metric']])} | "
                     f"{_fmt(c['card'][c['metric']])} | {c['card'][c['metric']] - c['base'][c['metric']]:+.1f} |")
    lines += ["", f"One mixed batch ({len(results['mixed'])} lines with their cards + the same lines with no card, "
              "one decode call):", ""]
    for i, line in enumerate(results["mixed"], 1):
        lines += [f"{i}. [{line['card']}] {line['input']}", f"   - card: {line['card_answer']}",
                  f"   - base: {line['base_answer']}"]
    lines += ["", "| stage | steps | train wall time | evaluation wall time |", "|---|---:|---:|---:|"]
    for c in results["cards"]:
        lines.append(f"| {c['model_dir']} | {c['steps']} | {c['train_wall_s']:.0f} s | {c['eval_wall_s']:.0f} s |")
    lines += ["", f"Wall time of this invocation (skipped stages cost nothing): {results['total_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def clean(out: str) -> None:
    """--fresh: removes only what this command writes (the cards, the base's scores, the results)."""
    for name, *_ in CARDS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in OUTPUTS + tuple(f"base_{task}.json" for _, _, task, _ in CARDS):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def run(args) -> dict:
    from t5lite.train.load import load_for_inference
    from t5lite.model import count_params, lora
    from t5lite.train.cards import check_base, load_card
    start = time.perf_counter()
    pre = base_stage(args)
    stages = {name: card_stage(name, gin_file, pre["model_dir"], args) for name, gin_file, _, _ in CARDS}
    config, params, vocab, _ = load_for_inference(pre["model_dir"])
    base, fingerprint = (config, params, vocab), lora.fingerprint(params, config)
    settings = _eval_settings(args)
    cards, scored = [], []
    for name, _, task_name, metric in CARDS:
        stage = stages[name]
        card = load_card(stage["model_dir"])
        check_base(card, fingerprint, pre["model_dir"])
        plain = score(os.path.join(args.out, f"base_{task_name}.json"), {"base": fingerprint, **settings},
                      task_name, base, None, args)
        adapted = score(os.path.join(stage["model_dir"], "cards_eval_test.json"),
                        {"base": fingerprint, "card_step": card.step, **settings}, task_name, base, card, args)
        print(f"== {name} ({task_name}): {metric} base {_fmt(plain['results'][metric])}, "
              f"card {_fmt(adapted['results'][metric])}", flush=True)
        cards.append((name, card, task_name))
        scored.append({"name": name, "task": task_name, "metric": metric, "steps": stage["steps"],
                       "model_dir": stage["model_dir"], "params": card.num_params,
                       "bytes_on_disk": sum(os.path.getsize(os.path.join(card.path, f)) for f in os.listdir(card.path)),
                       "base": plain["results"], "card": adapted["results"], "train_wall_s": stage["wall_s"],
                       "eval_wall_s": plain["wall_s"] + adapted["wall_s"]})
    results = {"quick": args.quick, "eval_settings": settings,
               "base": {"model_dir": pre["model_dir"], "steps": pre["steps"], "fingerprint": fingerprint,
                        "params": count_params(params)},
               "cards": scored, "mixed": mixed_batch(base, cards, args), "total_wall_s": time.perf_counter() - start}
    text = results_markdown(results)
    for name, content in zip(OUTPUTS, (text + "\n", json.dumps(results, indent=2, ensure_ascii=False))):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(content)
    print("\n" + text)
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json; the cards: "
          f"{', '.join(os.path.join(args.out, name, 'card') for name, *_ in CARDS)}")
    return results


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        demo.start(args.out, args.fresh, clean)  # its compilation cache: the cards' runs share compiled programs
        run(args)
    except UserError as e:
        print(f"t5lite.demos.cards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
