"""What every `t5lite` command does once cli.py has parsed its flags."""

import json
import logging
import os
import sys

from t5lite.errors import UserError


def run_training(args, finetune: bool = False) -> None:
    """Parses the gin files and --gin.* bindings and trains; the run validates everything before it
    writes into model_dir, then saves the config there (t5lite/train/trainer.py)."""
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
    if finetune and not (_query("train.init_checkpoint", "") or _query("%INITIAL_CHECKPOINT_PATH", "")):
        raise UserError("finetune needs a checkpoint to start from: --init_checkpoint DIR or "
                        "--gin.INITIAL_CHECKPOINT_PATH=DIR")
    metrics = gin_utils.train_into(model_dir, config_text)
    print(json.dumps({"model_dir": model_dir, **(metrics or {})}))


def _query(key: str, fix: str):
    import gin
    try:
        value = gin.query_parameter(key)
    except ValueError:
        if fix:
            raise UserError(f"{key.lstrip('%')} is not set; {fix}") from None
        return None
    if isinstance(value, gin.config.ConfigurableReference):  # e.g. train.init_checkpoint = %INITIAL_CHECKPOINT_PATH
        return None
    return value


def load_for_inference(checkpoint: str, vocab_path=None):
    """(config, params, vocab, decoder_only) from a training model_dir (its newest readable step) or a
    params checkpoint."""
    from t5lite.data import tasks
    from t5lite.data.vocab import Vocabulary
    from t5lite.train.checkpoint import (decoder_only_of, is_params_checkpoint, load_any_params,
                                         load_train_checkpoint_params)
    from t5lite.train.setup import checkpoint_vocabulary
    if not os.path.exists(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist; pass a model_dir or a converted checkpoint")
    if is_params_checkpoint(checkpoint):
        (config, params), vocab, decoder_only = load_any_params(checkpoint), None, False
    else:
        config, params, meta = load_train_checkpoint_params(checkpoint)
        vocab, decoder_only = checkpoint_vocabulary(meta), decoder_only_of(meta, params)
    if vocab_path:
        vocab = Vocabulary(vocab_path)
    return config, params, vocab or tasks.default_vocabulary(), decoder_only


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
    config, params, vocab, decoder_only = load_for_inference(args.checkpoint, args.vocab)
    task = tasks.get(args.task)
    with _progress(args.max_examples or 0, f"eval {args.task}/{args.split}") as bar:
        results, records = evaluate_task(config, params, task, vocab, split=args.split,
                                         max_examples=args.max_examples, batch_size=args.batch_size,
                                         input_length=args.input_length, max_decode_length=args.max_decode_length,
                                         strict=args.strict, decoder_only=decoder_only, progress=bar,
                                         **_decode_kwargs(args))
    if args.output:
        _write_jsonl(args.output, records)
    print(json.dumps({"task": args.task, "split": args.split, **results}))


def run_infer(args) -> None:
    """Decodes a task split or a text / JSONL file and writes JSONL (input, output, score) in order."""
    from t5lite.infer.evaluate import decode_texts
    texts = _read_inputs(args)
    config, params, vocab, decoder_only = load_for_inference(args.checkpoint, args.vocab)
    with _progress(len(texts), "infer") as bar:
        records = decode_texts(config, params, vocab, texts, input_length=args.input_length,
                               batch_size=args.batch_size, max_decode_length=args.max_decode_length,
                               strict=args.strict, decoder_only=decoder_only, progress=bar,
                               **_decode_kwargs(args))
    _write_jsonl(args.output, records)
    logging.info("wrote %d predictions to %s", len(records), args.output)
    print(f"wrote {len(records)} predictions to {args.output}")


def _read_inputs(args):
    """The input texts, one per line of --input (blank lines stay, as empty inputs) or the task's split."""
    if bool(args.task) == bool(args.input):
        raise UserError("give exactly one of --task (with --split) or --input FILE")
    if args.task:
        from t5lite.data import tasks
        examples = tasks.get(args.task).eval_examples(args.split, max_examples=args.max_examples)
        return [ex["inputs_pretokenized"] for ex in examples]
    if not os.path.isfile(args.input):
        raise UserError(f"input file {args.input} not found")
    with open(args.input, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the file's final newline ends the last line; it starts no new one
    texts = []
    for number, raw in enumerate(raw_lines[:args.max_examples] if args.max_examples else raw_lines, 1):
        line = _decode_line(raw.rstrip(b"\r"), args.input, number, args.encoding_errors)
        if args.input.endswith(".jsonl") and line.strip():
            try:
                line = str(json.loads(line)[args.input_key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{args.input}:{number}: not a JSON object with key {args.input_key!r}; "
                                "fix the line or pass --input_key") from None
        texts.append(line)
    return texts


def _decode_line(raw: bytes, path: str, number: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "convert the file (e.g. iconv -f latin1 -t utf-8) or pass --encoding_errors replace") from None


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


def convert_from_hf(args) -> None:
    from t5lite.convert.hf import from_hf
    from t5lite.train.checkpoint import save_params
    config, params = from_hf(args.hf_dir)
    save_params(args.out, config, params)
    print(f"wrote t5lite params checkpoint {args.out} ({config.num_encoder_layers}+{config.num_decoder_layers} "
          f"layers, d_model {config.emb_dim}, vocab {config.vocab_size})")


def convert_to_hf(args) -> None:
    """A params checkpoint, or a training model_dir's newest readable step (or --step), to HF T5."""
    from t5lite.convert.hf import to_hf
    from t5lite.train.checkpoint import decoder_only_of, is_params_checkpoint, load_params, load_train_checkpoint_params
    if not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist; pass a training model_dir or a params "
                        "checkpoint")
    if is_params_checkpoint(args.checkpoint):
        if args.step is not None:
            raise UserError("--step applies to a training model_dir, not to a params checkpoint")
        config, params = load_params(args.checkpoint)
    else:
        config, params, meta = load_train_checkpoint_params(args.checkpoint, args.step)
        if decoder_only_of(meta, params):
            raise UserError(f"{args.checkpoint} holds a decoder-only model; HF's T5 is an encoder-decoder, so it "
                            "has no HF T5 form")
    to_hf(config, params, args.out)
    print(f"wrote HF T5 checkpoint {args.out} (load with T5ForConditionalGeneration.from_pretrained)")


def vocab_train(args) -> None:
    from t5lite.data.vocab import Vocabulary, train_vocabulary
    model_path = train_vocabulary(args.input, args.vocab_size, args.out, model_type=args.model_type)
    vocab = Vocabulary(model_path)
    print(f"wrote {model_path}: {vocab.vocab_size} pieces, <extra_id_0> = {vocab.sentinel_id(0)}")


def _write_json(path, rows) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


def bench_decode(args) -> None:
    from t5lite.bench import decode_benchmark
    rows = decode_benchmark(args.model, tuple(args.batch_sizes), args.input_length, args.max_decode_length,
                            args.num_beams, with_hf=not args.no_hf, repeats=args.repeats, rounds=args.rounds)
    _write_json(args.json, rows)


def _overrides(pairs) -> dict:
    """['scan_layers=True', 'dtype=bfloat16'] -> {'scan_layers': True, 'dtype': 'bfloat16'}."""
    import ast
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} needs FIELD=VALUE, e.g. --set num_kv_heads=2")
        name, value = pair.split("=", 1)
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value  # a bare string such as bfloat16
    return out


def bench_train(args) -> None:
    from t5lite.bench import train_benchmark
    rows = [train_benchmark(model, args.batch_size, args.input_length, args.target_length, args.steps,
                            rounds=args.rounds, optimizer=args.optimizer, dropout=args.dropout,
                            with_hf=args.with_hf, vocab_size=args.vocab_size, peak_flops=args.peak_flops,
                            overrides=_overrides(args.set))
            for model in args.models]
    _write_json(args.json, rows)


def bench_data(args) -> None:
    from t5lite.bench import data_benchmark
    data_benchmark(args.task, args.batch_size, args.input_length, args.num_batches, pack=not args.no_pack)


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
