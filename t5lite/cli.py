"""`t5lite <command> ...`: the single command-line entry point.

User mistakes (UserError) print one line `t5lite: error: ...` and exit with code 2.
"""

import argparse
import functools
import math
import sys

from t5lite.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value) are one line and exit 2, like a UserError."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high] (open ends where asked; +-inf bounds = unbounded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
FINITE = _float_in(-math.inf, math.inf)


def _add_training(commands, name: str, help_text: str, finetune: bool, distill: bool = False):
    from t5lite import commands as run
    p = commands.add_parser(name, help=help_text, description=help_text + ". Bind anything with "
                            "--gin.NAME=VALUE (macros like --gin.TRAIN_STEPS=30 or --gin.train.learning_rate=0.01); "
                            "later files and flags win.")
    p.add_argument("--gin_file", action="append", default=[], help="gin run file (repeatable)")
    p.add_argument("--model_dir", help="where checkpoints, metrics.jsonl and TensorBoard logs go (sets MODEL_DIR)")
    p.add_argument("--print_config", action="store_true", help="print the parsed gin config and exit")
    if finetune or distill:
        p.add_argument("--init_checkpoint", help="checkpoint to start from (sets INITIAL_CHECKPOINT_PATH)"
                       + ("; default: random weights" if distill else ""))
    if distill:
        p.add_argument("--teacher", required=True, help="the teacher: a training model_dir or a params checkpoint "
                       "(e.g. from `convert from-hf`) with the student's vocab_size (sets train.teacher_checkpoint; "
                       "train.loss defaults to 'distillation')")
    p.set_defaults(run=functools.partial(run.run_training, finetune=finetune), init_checkpoint=None, teacher=None,
                   takes_gin=True)


def _add_decoding_flags(p, checkpoint: str = "--checkpoint", split: str = "validation"):
    p.add_argument(checkpoint, dest="checkpoint", required=True,
                   help="a training model_dir or a converted params checkpoint")
    p.add_argument("--vocab", help="SentencePiece model (default: the checkpoint's, else the shipped one)")
    p.add_argument("--split", default=split)
    p.add_argument("--max_examples", type=POSITIVE, default=None)
    p.add_argument("--batch_size", type=POSITIVE, default=32, help="most inputs in one batch (>= 1)")
    p.add_argument("--max_batch_tokens", type=POSITIVE, default=None,
                   help="most padded input tokens in one batch (default: batch_size x 128); inputs are sorted by "
                   "length and batched under this budget, a long input alone, outputs still in input order")
    p.add_argument("--input_length", type=POSITIVE, default=128,
                   help="longer inputs are truncated (one warning counts them), or refused with --strict")
    p.add_argument("--max_decode_length", type=POSITIVE, default=64)
    p.add_argument("--strict", action="store_true", help="reject inputs longer than --input_length")
    p.add_argument("--method", default="greedy", choices=["greedy", "beam", "sample"])
    p.add_argument("--num_beams", type=POSITIVE, default=4)
    p.add_argument("--length_penalty", type=FINITE, default=1.0, help="beam score exponent (finite)")
    p.add_argument("--temperature", type=_float_in(0, math.inf, low_open=True), default=1.0, help="> 0")
    p.add_argument("--top_k", type=NON_NEGATIVE, default=0, help="0: off; at most the vocabulary size")
    p.add_argument("--top_p", type=_float_in(0, 1, low_open=True), default=1.0, help="in (0, 1]")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)


def _add_sweep(commands):
    """`t5lite sweep run | summary | fit`; the bodies are in t5lite/scaling/command.py."""
    from t5lite.scaling import command as sweep_command
    sweep = commands.add_parser("sweep", help="a grid of training runs: ablations over seeds, scaling-law fits",
                                description="Run a grid of ordinary training runs under one root directory, "
                                "summarise them (CSV / JSONL / table, mean ± std over seeds, Welch's t-test against "
                                "a baseline) and fit scaling laws L(N, D) = E + A/N^alpha + B/D^beta.")
    actions = sweep.add_subparsers(dest="action", required=True, metavar="ACTION")

    def fit_flags(p):
        p.add_argument("--loss", choices=["eval_loss", "train_loss"], help="what to fit (default: eval_loss if logged)")
        p.add_argument("--params", default="params_non_embedding", choices=["params_non_embedding", "params"],
                       help="N of the fit: non-embedding (Kaplan et al.) or total parameters")
        p.add_argument("--bootstrap", type=NON_NEGATIVE, default=100, help="bootstrap resamples for the intervals")
        p.add_argument("--bootstrap_seed", type=NON_NEGATIVE, default=0, help="seed of the bootstrap resampling")

    def spec_flags(p):
        p.add_argument("sweep_file", nargs="?", help="a sweep file (TOML; see experiments/scaling/tiny.toml)")
        p.add_argument("--root", required=True, help="directory of the sweep: one run directory per point")
        p.add_argument("--gin_file", action="append", default=[], help="base gin run file (repeatable)")
        p.add_argument("--grid", action="append", default=[], metavar="NAME=[V1,V2,...]",
                       help="an axis of the grid, e.g. 'T5Config.emb_dim=[64,128]' (repeatable: cartesian product)")
        p.add_argument("--seeds", type=POSITIVE, metavar="N", help="run every point with RANDOM_SEED = 0..N-1 (default: the sweep "
                       "file's seeds, else 1)")
        p.add_argument("--fit", action="store_true", help="also fit the scaling laws (like `t5lite sweep fit`)")
        fit_flags(p)

    p = actions.add_parser("run", help="train every point not yet done, one after another, then summarise",
                           description="Every point is `t5lite train` in a subprocess; fixed bindings with "
                           "--gin.NAME=VALUE. A re-run skips finished points and resumes interrupted ones.")
    spec_flags(p)
    p.add_argument("--print_commands", action="store_true", help="print one `t5lite train` shell line per point "
                   "(to launch them elsewhere) and exit")
    p.add_argument("--dry_run", action="store_true", help="print each point's N, D and FLOPs and exit")
    p.add_argument("--skip_failed", action="store_true", help="do not retry points that failed before")
    p.add_argument("--task_metrics", action="store_true", help="also decode the validation split of tasks with "
                   "metrics (BLEU, ...) with each final checkpoint (slow)")
    p.add_argument("--eval_examples", type=POSITIVE, help="examples decoded for --task_metrics (default 200) and for "
                   "a [score] (default: its max_examples)")
    p.add_argument("--verbose", action="store_true", help="echo each run's output (always in ROOT/<point>/train.log)")
    p.add_argument("--results", metavar="PAGE.md", help="also write a results page (+ PAGE.png): question, table "
                   "over seeds, finding, machine, date, commit, command (a study file's default: "
                   "docs/results/<study>.md)")
    p.set_defaults(run=sweep_command.run, takes_gin=True)
    p = actions.add_parser("summary", help="re-read the run directories (e.g. points launched elsewhere) and "
                           "write the summary")
    spec_flags(p)
    p.set_defaults(run=sweep_command.summary, takes_gin=True)
    p = actions.add_parser("fit", help="fit L(N, D), L(N), L(D) to a summarised sweep; writes fit.json and plots")
    p.add_argument("root", help="the sweep's --root")
    fit_flags(p)
    p.set_defaults(run=sweep_command.fit)


def build_parser() -> argparse.ArgumentParser:
    from t5lite import commands as run
    import t5lite
    parser = _Parser(prog="t5lite", description="T5-style encoder-decoder research in JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"t5lite {t5lite.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training(commands, "train", "train a model from gin run files (pre-training or any training)", False)
    _add_training(commands, "finetune", "train starting from a checkpoint's parameters", True)

    p = commands.add_parser("eval", help="metrics of a checkpoint on a task split (decoding + perplexity)")
    p.add_argument("--task", required=True, help="task name, e.g. bible_translate_en_es")
    p.add_argument("--output", help="also write per-example predictions as JSONL")
    p.add_argument("--card", help="score the base --checkpoint with this adapter card (a card directory or a card "
                   "run's model_dir), in the same decode program as `infer --card`")
    _add_decoding_flags(p)
    p.set_defaults(run=run.run_eval)

    p = commands.add_parser("infer", help="decode a task split or a text/JSONL file to JSONL")
    p.add_argument("--task", help="decode this task's --split")
    p.add_argument("--input", help="a text file (one input per line) or JSONL (see --input_key)")
    p.add_argument("--input_key", default="inputs", help="field of each JSONL record to decode")
    p.add_argument("--encoding_errors", default="strict", choices=["strict", "replace"],
                   help="input that is not UTF-8: stop with the line number (strict) or decode bad bytes as U+FFFD")
    p.add_argument("--output", required=True, help="JSONL to write: input, output, score per line, in order")
    p.add_argument("--card", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter card (repeatable); each JSONL line picks one by its --card_key field, and one "
                   "batch mixes cards")
    p.add_argument("--card_key", default="card", help="JSONL field naming a line's card (null, '' or 'base': none)")
    p.add_argument("--default_card", help="card of lines without a card field (default: the only --card, else base)")
    _add_decoding_flags(p)
    p.set_defaults(run=run.run_infer)

    convert = commands.add_parser("convert", help="convert checkpoints to and from HF transformers "
                                  "(T5, mT5, UMT5, Switch Transformers, T5Gemma)")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    p = directions.add_parser("from-hf", help="HF T5 / mT5 / UMT5 / Switch / T5Gemma directory (config.json + "
                              "model.safetensors) -> t5lite")
    p.add_argument("--hf_dir", required=True, help="directory written by HF save_pretrained")
    p.add_argument("--out", required=True, help="new directory for the t5lite params checkpoint")
    p.set_defaults(run=run.convert_from_hf)
    p = directions.add_parser("to-hf", help="t5lite checkpoint (a training model_dir or a params checkpoint) -> "
                              "HF T5 / UMT5 / Switch / T5Gemma")
    p.add_argument("--checkpoint", required=True, help="a training model_dir (its newest readable step) or a params "
                   "checkpoint directory")
    p.add_argument("--step", type=NON_NEGATIVE, default=None, help="export this step of a training model_dir")
    p.add_argument("--vocab", help="SentencePiece model to export as the HF tokenizer (default: the one a training "
                   "model_dir stored; a params checkpoint records none)")
    p.add_argument("--out", required=True, help="new directory for the HF checkpoint (config.json, "
                   "model.safetensors, and spiece.model + tokenizer_config.json when the vocabulary is known)")
    p.set_defaults(run=run.convert_to_hf)

    distill = commands.add_parser("distill", help="knowledge distillation: train a student on a teacher, or turn a "
                                  "teacher's outputs into a task")
    actions = distill.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_training(actions, "train", "train a student on a teacher's soft targets (token-level distillation)", False,
                  distill=True)
    p = actions.add_parser("make-data", help="decode a task split with the teacher and write (input, teacher output) "
                           "pairs, one line per input, for sequence-level distillation")
    p.add_argument("--task", required=True, help="task whose split's inputs the teacher decodes")
    p.add_argument("--out", required=True, help="the .jsonl or .tsv file to write")
    p.add_argument("--name", help="name of the task over --out (default: TASK_distilled)")
    _add_decoding_flags(p, checkpoint="--teacher", split="train")
    p.set_defaults(run=run.distill_make_data)

    cards = commands.add_parser("cards", help="adapter cards (LoRA): inspect, merge into the base, export to PEFT")
    actions = cards.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("info", help="rank, alpha, targets, size and base fingerprint of a card")
    p.add_argument("card", help="a card directory or a card run's model_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run.cards_info)
    p = actions.add_parser("merge", help="fold a card into its base: an ordinary params checkpoint")
    p.add_argument("card", help="a card directory or a card run's model_dir")
    p.add_argument("--base", help="the base checkpoint (default: the one the card was trained on)")
    p.add_argument("--out", required=True, help="new directory for the merged params checkpoint")
    p.set_defaults(run=run.cards_merge)
    p = actions.add_parser("export", help="write a card as an HF PEFT LoRA adapter (adapter_config.json + "
                           "adapter_model.safetensors) for the base exported with `t5lite convert to-hf`")
    p.add_argument("card", help="a card directory or a card run's model_dir")
    p.add_argument("--format", default="peft", choices=["peft"])
    p.add_argument("--base_model_name_or_path", help="recorded in adapter_config.json (e.g. the HF base directory)")
    p.add_argument("--out", required=True, help="new directory for the adapter")
    p.set_defaults(run=run.cards_export)

    vocab = commands.add_parser("vocab", help="SentencePiece vocabularies")
    actions = vocab.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("train", help="train a vocabulary with T5's layout (100 sentinels on top)")
    p.add_argument("--input", required=True, nargs="+", help="text files (one sentence or document per line)")
    p.add_argument("--vocab_size", required=True, type=POSITIVE, help="total pieces, sentinels included")
    p.add_argument("--out", required=True, help="directory for spiece.model / spiece.vocab")
    p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    p.set_defaults(run=run.vocab_train)
    bench = commands.add_parser("bench", help="throughput benchmarks: each framework in its own process, "
                                "alternating rounds; run on an idle machine")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = kinds.add_parser("decode", help="greedy and beam decoding tokens/s, side by side with HF generate")
    p.add_argument("--model", default="t5_1_1_small", help="preset name (random weights)")
    p.add_argument("--batch_sizes", type=POSITIVE, nargs="+", default=[1, 32])
    p.add_argument("--input_length", type=POSITIVE, default=128)
    p.add_argument("--max_decode_length", type=POSITIVE, default=64)
    p.add_argument("--num_beams", type=POSITIVE, default=4)
    p.add_argument("--repeats", type=POSITIVE, default=2, help="timed runs per case and round, after a warm-up")
    p.add_argument("--rounds", type=POSITIVE, default=2, help="rounds per framework, alternating which goes first")
    p.add_argument("--no_hf", action="store_true", help="skip the HF transformers comparison")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=run.bench_decode)
    p = kinds.add_parser("train", help="train-step time, tokens/s and MFU on random tokens (optionally vs HF)")
    p.add_argument("--models", nargs="+", default=["tiny", "t5_1_1_small"], help="preset names")
    p.add_argument("--batch_size", type=POSITIVE, default=8)
    p.add_argument("--input_length", type=POSITIVE, default=128)
    p.add_argument("--target_length", type=POSITIVE, default=32)
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps per round after one compile step")
    p.add_argument("--rounds", type=POSITIVE, default=2, help="rounds per framework, alternating which goes first")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"],
                   help="the same on both sides (HF: torch AdamW or transformers' Adafactor)")
    p.add_argument("--dropout", type=_float_in(0, 1, high_open=True), default=0.0, help="in [0, 1)")
    p.add_argument("--vocab_size", type=POSITIVE, default=None, help="override the presets' vocabulary size")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="T5Config field for every model (repeatable), e.g. --set position_scheme=rope")
    p.add_argument("--peak_flops", type=_float_in(0, math.inf, low_open=True), default=None, help="per-device peak FLOP/s for MFU (default: known "
                   "accelerators, or the host CPU's theoretical AVX2 f32 peak)")
    p.add_argument("--with_hf", action="store_true", help="also time HF transformers (PyTorch)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=run.bench_train)
    p = kinds.add_parser("cards", help="decode tokens/s with N adapter cards mixed in one batch vs one merged model "
                         "vs card by card")
    p.add_argument("--model", default="t5_1_1_small", help="preset name (random weights and cards)")
    p.add_argument("--batch_size", type=POSITIVE, default=32)
    p.add_argument("--num_cards", type=POSITIVE, nargs="+", default=[1, 4, 16], help="each must divide the batch size")
    p.add_argument("--rank", type=POSITIVE, default=8)
    p.add_argument("--input_length", type=POSITIVE, default=64)
    p.add_argument("--max_decode_length", type=POSITIVE, default=32)
    p.add_argument("--method", default="greedy", choices=["greedy", "beam", "sample"])
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed runs per case after a warm-up")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=run.bench_cards)
    p = kinds.add_parser("data", help="input-pipeline throughput (span corruption by default)")
    p.add_argument("--task", default="bible_span_corruption_en_es")
    p.add_argument("--batch_size", type=POSITIVE, default=32)
    p.add_argument("--input_length", type=POSITIVE, default=512)
    p.add_argument("--num_batches", type=POSITIVE, default=128,
                   help="batches timed from the first one (packing prepares a window of batches ahead)")
    p.add_argument("--no_pack", action="store_true")
    p.set_defaults(run=run.bench_data)

    # `t5lite compile`: ahead-of-time compilation for a TPU slice (body: commands.run_compile).
    p = commands.add_parser("compile", help="compile a run for a TPU slice on this host: memory per chip (fits?), "
                            "FLOPs, collectives, XLA warnings", description="Compiles the gin run's real train, eval "
                            "and decode steps for a TPU topology ahead of time (needs libtpu: pip install "
                            "'t5lite[tpu]'). Bind anything with --gin.NAME=VALUE.")
    p.add_argument("--topology", required=True, help="v5e-64, v4-128, v5p-256, v6e-16 (Cloud TPU accelerator types) "
                   "or a slice shape like v5e:4x4, v4:2x2x4")
    p.add_argument("--gin_file", action="append", default=[], help="gin run file (repeatable)")
    p.add_argument("--programs", default="train,eval,decode", help="comma-separated: train, eval, decode")
    p.add_argument("--batch_size", type=POSITIVE, help="global batch (default: the run's BATCH_SIZE)")
    p.add_argument("--decode_batch", type=POSITIVE, help="serving batch for the decode program (default: the batch size)")
    p.add_argument("--decode_input_length", type=POSITIVE, help="default: the run's inputs length")
    p.add_argument("--max_decode_length", type=POSITIVE, help="default: the run's targets length")
    p.add_argument("--decode_method", default="greedy", choices=["greedy", "beam"])
    p.add_argument("--num_beams", type=POSITIVE, default=4)
    p.add_argument("--max_batch", action="store_true", help="also search the largest global batch whose train step "
                   "fits (compiles the train step once per candidate)")
    p.add_argument("--max_batch_compiles", type=POSITIVE, default=8, help="bound on the compiles of --max_batch")
    p.add_argument("--hlo_dir", help="also write each program's optimized HLO here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run.run_compile, takes_gin=True)

    _add_sweep(commands)
    p = commands.add_parser("recipes", help="list the shipped gin run files (any of them works as --gin_file or "
                            "in an include, from any directory)")
    p.add_argument("--paths", action="store_true", help="print only the paths, one a line")
    p.set_defaults(run=run.list_recipes)
    return parser


def _split_gin_flags(argv):
    """--gin.NAME=VALUE flags are not argparse options: pull them out in order."""
    gin_flags, rest = [], []
    for arg in argv:
        (gin_flags.append(arg[len("--gin."):]) if arg.startswith("--gin.") else rest.append(arg))
    return gin_flags, rest


def main(argv=None) -> int:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    gin_flags, rest = _split_gin_flags(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(rest)
    except SystemExit as e:  # --help (0) or a flag error, already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    args.gin = gin_flags
    args.argv = ["t5lite", *(sys.argv[1:] if argv is None else argv)]  # a results page cites the command
    if gin_flags and not getattr(args, "takes_gin", False):
        print(f"t5lite: error: --gin.* flags apply to train, finetune, distill train, compile and sweep run|summary, "
              f"not {args.command}",
              file=sys.stderr)
        return 2
    try:
        args.run(args)
    except UserError as e:
        # One line: gin appends "In call to configurable ..." context on further lines.
        message = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
        print(f"t5lite: {getattr(e, 'label', 'error')}: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first, see train/preemption.py)
        print(f"t5lite: interrupted: {args.command} stopped by Ctrl-C", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
