"""What `t5lite train | finetune | eval | infer` do once their flags are parsed (see cli.py)."""

import json
import logging
import os
import sys

from t5lite.errors import UserError


def run_training(args, finetune: bool = False) -> None:
    """Parses the gin files and --gin.* bindings, saves the config to model_dir, then trains."""
    from t5lite import gin_utils
    if not args.gin_file:
        raise UserError("give at least one --gin_file (e.g. experiments/demo/pretrain.gin)")
    bindings = list(args.gin)
    if finetune and args.init_checkpoint:
        bindings.append(f"INITIAL_CHECKPOINT_PATH={args.init_checkpoint}")
    gin_utils.parse(args.gin_file, bindings, args.model_dir)
    config_text = gin_utils.config_text()
    if args.print_config:
        print(config_text)
        return
    model_dir = _query("%MODEL_DIR", "set --model_dir (or MODEL_DIR in a gin file)")
    if finetune:
        init = _query("train.init_checkpoint", "")
        if not isinstance(init, (str, type(None))):  # bound through the INITIAL_CHECKPOINT_PATH macro
            init = _query("%INITIAL_CHECKPOINT_PATH", "")
        if not init:
            raise UserError("finetune needs a checkpoint to start from: --init_checkpoint DIR or "
                            "--gin.INITIAL_CHECKPOINT_PATH=DIR")
        if not os.path.exists(init):
            raise UserError(f"initial checkpoint {init} does not exist; train or convert one first")
    metrics = gin_utils.train_into(model_dir, config_text)
    print(json.dumps({"model_dir": model_dir, **{k: v for k, v in (metrics or {}).items()}}))


def _query(key: str, fix: str):
    import gin
    try:
        return gin.query_parameter(key)
    except ValueError:
        if fix:
            raise UserError(f"{key.lstrip('%')} is not set; {fix}") from None
        return None


def load_for_inference(checkpoint: str, vocab_path=None):
    """(config, params, vocab) from a training model_dir or a params checkpoint."""
    from t5lite.data import tasks
    from t5lite.data.vocab import Vocabulary
    from t5lite.train.checkpoint import load_any_params, load_train_checkpoint_params
    from t5lite.train.trainer import checkpoint_vocabulary
    if not os.path.exists(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist; pass a model_dir or a converted checkpoint")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        config, params = load_any_params(checkpoint)
        vocab = None
    else:
        config, params, meta = load_train_checkpoint_params(checkpoint)
        vocab = checkpoint_vocabulary(meta)
    if vocab_path:
        vocab = Vocabulary(vocab_path)
    return config, params, vocab or tasks.default_vocabulary()


def _decode_kwargs(args) -> dict:
    return dict(method=args.method, num_beams=args.num_beams, length_penalty=args.length_penalty,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="ex", disable=not sys.stderr.isatty())


def run_eval(args) -> None:
    """Decodes a task split with a checkpoint and prints the task's metrics plus perplexity."""
    from t5lite.data import tasks
    from t5lite.infer.evaluate import evaluate_task
    config, params, vocab = load_for_inference(args.checkpoint, args.vocab)
    task = tasks.get(args.task)
    with _progress(args.max_examples or 0, f"eval {args.task}/{args.split}") as bar:
        results, records = evaluate_task(config, params, task, vocab, split=args.split,
                                         max_examples=args.max_examples, batch_size=args.batch_size,
                                         input_length=args.input_length, max_decode_length=args.max_decode_length,
                                         strict=args.strict, progress=bar, **_decode_kwargs(args))
    if args.output:
        _write_jsonl(args.output, records)
    print(json.dumps({"task": args.task, "split": args.split, **results}))


def run_infer(args) -> None:
    """Decodes a task split or a text / JSONL file and writes JSONL (input, output, score) in order."""
    from t5lite.infer.evaluate import decode_texts
    config, params, vocab = load_for_inference(args.checkpoint, args.vocab)
    texts = _read_inputs(args, vocab)
    with _progress(len(texts), "infer") as bar:
        records = decode_texts(config, params, vocab, texts, input_length=args.input_length,
                               batch_size=args.batch_size, max_decode_length=args.max_decode_length,
                               strict=args.strict, progress=bar, **_decode_kwargs(args))
    _write_jsonl(args.output, records)
    logging.info("wrote %d predictions to %s", len(records), args.output)
    print(f"wrote {len(records)} predictions to {args.output}")


def _read_inputs(args, vocab):
    if bool(args.task) == bool(args.input):
        raise UserError("give exactly one of --task (with --split) or --input FILE")
    if args.task:
        from t5lite.data import tasks
        examples = tasks.get(args.task).eval_examples(args.split, vocab, max_examples=args.max_examples)
        return [ex["inputs_pretokenized"] for ex in examples]
    if not os.path.isfile(args.input):
        raise UserError(f"input file {args.input} not found")
    texts = []
    with open(args.input, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if args.input.endswith(".jsonl"):
                try:
                    texts.append(str(json.loads(line)[args.input_key]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{args.input}:{number}: not a JSON object with key {args.input_key!r}; "
                                    "fix the line or pass --input_key") from None
            else:
                texts.append(line)
            if args.max_examples and len(texts) >= args.max_examples:
                break
    return texts


def _write_jsonl(path: str, records) -> None:
    """Written to a temporary name and renamed, so a failure never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _train_arguments() -> dict:
    """train()'s arguments as the parsed gin files bind them, its defaults for the rest."""
    import inspect

    import gin

    from t5lite import gin_utils
    from t5lite.train import trainer
    args = {name: p.default for name, p in inspect.signature(trainer.train).parameters.items()
            if p.default is not inspect.Parameter.empty}
    args.update(gin_utils.call_configured(lambda: gin.get_bindings("train")))
    for name, macro in (("batch_size", "BATCH_SIZE"), ("feature_lengths", "TASK_FEATURE_LENGTHS")):
        if args.get(name) is None:
            raise UserError(f"the gin files bind no train.{name}: set {macro} (e.g. include 'base.gin')")
    return args


def run_compile(args) -> None:
    """Compiles the gin run for a TPU topology; prints memory per chip (fits?), FLOPs, collectives, warnings."""
    from t5lite import aot, gin_utils
    if not args.gin_file:
        raise UserError("give at least one --gin_file (e.g. experiments/pretrain/t5_1_1_base_c4.gin)")
    topology = aot.parse_topology(args.topology)  # a typo fails before any gin parsing
    gin_utils.parse(args.gin_file, list(args.gin), "(t5lite compile: no model_dir)")
    train_args = _train_arguments()
    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    report = aot.compile_run(train_args, topology, programs=programs, batch_size=args.batch_size,
                             decode_batch=args.decode_batch, decode_input_length=args.decode_input_length,
                             max_decode_length=args.max_decode_length, decode_method=args.decode_method,
                             num_beams=args.num_beams, hlo_dir=args.hlo_dir)
    if args.max_batch:
        report["largest_batch"] = aot.search_batch(train_args, topology, start=report["batch_size"],
                                                   max_compiles=args.max_batch_compiles)
    print(json.dumps(report, indent=1) if args.json else aot.format_report(report))
