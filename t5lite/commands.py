"""What every `t5lite` command does once cli.py has parsed its flags."""

import json
import logging
import os
import sys

from t5lite.errors import UserError
from t5lite.fileio import check_output_dir, check_output_file, write_lines


def run_training(args, finetune: bool = False) -> None:
    """Parses the gin files and --gin.* bindings and trains; the run validates everything before it
    writes into model_dir, then saves the config there (t5lite/train/trainer.py)."""
    from t5lite import gin_utils
    from t5lite.train import trainer
    if not args.gin_file:
        raise UserError("give at least one --gin_file (e.g. experiments/demo/pretrain.gin)")
    bindings = list(args.gin)
    if args.init_checkpoint:
        bindings.append(f"INITIAL_CHECKPOINT_PATH={args.init_checkpoint}")
    gin_utils.parse(args.gin_file, bindings, args.model_dir)
    if args.teacher:  # `distill train`: the teacher, and the distillation loss unless the gin files chose one
        _bind_teacher(args.teacher)
    config_text = gin_utils.config_text()
    if args.print_config:
        print(config_text)
        return
    model_dir = _query("%MODEL_DIR", "set --model_dir (or MODEL_DIR in a gin file)")
    init = _query("train.init_checkpoint", "") or _query("%INITIAL_CHECKPOINT_PATH", "")
    if finetune and not init:
        raise UserError("finetune needs a checkpoint to start from: --init_checkpoint DIR or "
                        "--gin.INITIAL_CHECKPOINT_PATH=DIR")
    from t5lite.train.load import refuse_card_run
    if isinstance(init, str):
        refuse_card_run(init, "--init_checkpoint")
    teacher = _query("train.teacher_checkpoint", "")
    if isinstance(teacher, str):
        refuse_card_run(teacher, "--teacher")
    metrics = trainer.train(gin_utils.train_config(), operative_gin=config_text,
                            write_configs=gin_utils.config_writer(config_text))
    print(json.dumps({"model_dir": model_dir, **(metrics or {})}))


def _bind_teacher(teacher: str) -> None:
    import gin
    with gin.unlock_config():
        gin.bind_parameter("train.teacher_checkpoint", teacher)
        try:
            gin.query_parameter("train.loss")
        except ValueError:  # not bound by the gin files
            gin.bind_parameter("train.loss", "distillation")


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


def _load_decoder(args, flag: str = "--checkpoint"):
    """load_for_inference plus the decoding flags that need the model: --top_k at most the vocabulary."""
    from t5lite.train.load import load_for_inference
    config, params, vocab, decoder_only = load_for_inference(args.checkpoint, args.vocab, flag)
    if args.top_k > config.vocab_size:
        raise UserError(f"--top_k {args.top_k} is larger than the vocabulary ({config.vocab_size}); use "
                        f"0 (off) to {config.vocab_size}")
    return config, params, vocab, decoder_only


def _decode_kwargs(args) -> dict:
    return dict(method=args.method, num_beams=args.num_beams, length_penalty=args.length_penalty,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                max_batch_tokens=args.max_batch_tokens)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="ex", disable=not sys.stderr.isatty())


def run_eval(args) -> None:
    """Decodes a task split with a checkpoint (with --card: the base plus that adapter card) and prints the
    task's metrics plus perplexity."""
    from t5lite.data import tasks
    from t5lite.infer.evaluate import evaluate_task
    from t5lite.train.cards import load_card
    if args.output:
        check_output_file(args.output, "--output")
    card = load_card(args.card) if args.card else None  # a bad card fails before the base is read
    task = tasks.get(args.task)
    config, params, vocab, decoder_only = _load_decoder(args)
    cards = _stack_cards({"card": card}, config, params, args.checkpoint)[0] if card else None
    with _progress(args.max_examples or 0, f"eval {args.task}/{args.split}") as bar:
        results, records = evaluate_task(config, params, task, vocab, split=args.split,
                                         max_examples=args.max_examples, batch_size=args.batch_size,
                                         input_length=args.input_length, max_decode_length=args.max_decode_length,
                                         strict=args.strict, decoder_only=decoder_only, progress=bar, cards=cards,
                                         **_decode_kwargs(args))
    if args.output:
        _write_jsonl(args.output, records)
    print(json.dumps({"task": args.task, "split": args.split, **({"card": card.path} if card else {}), **results}))


def run_infer(args) -> None:
    """Decodes a task split or a text / JSONL file and writes JSONL (input, output, score) in order; with
    --card NAME=DIR, each line decodes with the card its JSONL field names, all in the same batches."""
    from t5lite.infer.evaluate import decode_texts
    check_output_file(args.output, "--output", inputs=[args.input])
    named = _named_cards(args.card)  # a bad --card fails before any reading
    texts, line_cards = _read_inputs(args)
    config, params, vocab, decoder_only = _load_decoder(args)
    cards, card_index = None, None
    if named:
        cards, names = _stack_cards(named, config, params, args.checkpoint)
        card_index = _card_index(line_cards, names, args.default_card, args.input)
    with _progress(len(texts), "infer") as bar:
        records = decode_texts(config, params, vocab, texts, input_length=args.input_length,
                               batch_size=args.batch_size, max_decode_length=args.max_decode_length,
                               strict=args.strict, decoder_only=decoder_only, progress=bar, cards=cards,
                               card_index=card_index, **_decode_kwargs(args))
    if named:
        for record, i in zip(records, card_index):
            record["card"] = names[i] if i >= 0 else None
    _write_jsonl(args.output, records)
    logging.info("wrote %d predictions to %s", len(records), args.output)
    print(f"wrote {len(records)} predictions to {args.output}")


def _read_inputs(args):
    """(texts, card names) of --input's lines (blank lines stay, as empty inputs) or of the task's split; a
    JSONL line's card name is its --card_key field (absent: None)."""
    if bool(args.task) == bool(args.input):
        raise UserError("give exactly one of --task (with --split) or --input FILE")
    if args.task:
        from t5lite.data import tasks
        examples = tasks.get(args.task).eval_examples(args.split, max_examples=args.max_examples)
        return [ex["inputs_pretokenized"] for ex in examples], [None] * len(examples)
    if not os.path.isfile(args.input):
        raise UserError(f"input file {args.input} not found")
    with open(args.input, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the file's final newline ends the last line; it starts no new one
    texts, cards = [], []
    for number, raw in enumerate(raw_lines[:args.max_examples] if args.max_examples else raw_lines, 1):
        line, card = _decode_line(raw.rstrip(b"\r"), args.input, number, args.encoding_errors), None
        if args.input.endswith(".jsonl") and line.strip():
            try:
                record = json.loads(line)
                line, card = str(record[args.input_key]), record.get(args.card_key)
                card = "base" if card is None and args.card_key in record else card  # an explicit null
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{args.input}:{number}: not a JSON object with key {args.input_key!r}; "
                                "fix the line or pass --input_key") from None
        texts.append(line)
        cards.append(card)
    return texts, cards


# --- Adapter cards (t5lite/model/lora.py, t5lite/train/cards.py) --------------------------------------


def _named_cards(pairs):
    """['es=runs/es', ...] -> {'es': Card}, read and checked for format (not yet for the base)."""
    from t5lite.train.cards import load_card
    named = {}
    for pair in pairs or ():
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--card {pair!r} needs NAME=DIR, e.g. --card es=runs/lora_es")
        if name.strip() in named or name.strip() == "base":
            raise UserError(f"--card name {name.strip()!r} is {'reserved' if name.strip() == 'base' else 'repeated'}; "
                            "give each card its own name")
        named[name.strip()] = load_card(path.strip())
    return named


def _stack_cards(named, config, params, checkpoint):
    """Checks that every card belongs to this base -> (lora.CardTable, names in table order)."""
    from t5lite.model import lora
    from t5lite.train.cards import check_base
    base_fingerprint = lora.fingerprint(params, config)
    for card in named.values():
        check_base(card, base_fingerprint, checkpoint)
    names = list(named)
    return lora.stack_cards([(named[n].spec, named[n].params) for n in names], config), names


def _card_index(line_cards, names, default, input_path):
    """Each line's card number (-1: the base). A line without a card field gets --default_card, or the only
    card when one is given; null, '' or 'base' mean the base."""
    if default is None:
        default = names[0] if len(names) == 1 else "base"
    if default not in names + ["base"]:
        raise UserError(f"--default_card {default!r} is not one of the --card names ({', '.join(names)}) or 'base'")
    index = []
    for number, card in enumerate(line_cards, 1):
        name = default if card is None else (str(card) or "base")
        if name not in names + ["base"]:
            raise UserError(f"{input_path}:{number}: card {name!r} is not one of the --card names "
                            f"({', '.join(names)}); add --card {name}=DIR or fix the line")
        index.append(names.index(name) if name != "base" else -1)
    return index


def _decode_line(raw: bytes, path: str, number: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "convert the file (e.g. iconv -f latin1 -t utf-8) or pass --encoding_errors replace") from None


def _write_jsonl(path: str, records) -> None:
    """Written to a temporary name and renamed, so a failure never leaves half a file."""
    write_lines(path, (json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def convert_from_hf(args) -> None:
    from t5lite.convert.hf import from_hf
    from t5lite.train.checkpoint import save_params
    check_output_dir(args.out, "--out")
    config, params = from_hf(args.hf_dir)
    save_params(args.out, config, params)
    print(f"wrote t5lite params checkpoint {args.out} ({config.num_encoder_layers}+{config.num_decoder_layers} "
          f"layers, d_model {config.emb_dim}, vocab {config.vocab_size})")


def convert_to_hf(args) -> None:
    """A params checkpoint, or a training model_dir's newest readable step (or --step), to HF T5 / UMT5 / Switch / T5Gemma,
    with the tokenizer files when the vocabulary is known."""
    from t5lite.convert.hf import MODEL_CLASSES, family, to_hf
    from t5lite.data.vocab import Vocabulary
    from t5lite.train.checks import checkpoint_vocabulary
    from t5lite.train.checkpoint import (
        decoder_only_of,
        is_params_checkpoint,
        load_params,
        load_train_checkpoint_params,
    )
    check_output_dir(args.out, "--out")
    if not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist; pass a training model_dir or a params "
                        "checkpoint")
    from t5lite.train.load import refuse_card_run
    refuse_card_run(args.checkpoint, "--checkpoint")
    given = Vocabulary(args.vocab) if args.vocab else None
    if is_params_checkpoint(args.checkpoint):
        if args.step is not None:
            raise UserError("--step applies to a training model_dir, not to a params checkpoint")
        (config, params), vocab = load_params(args.checkpoint), given
    else:
        config, params, meta = load_train_checkpoint_params(args.checkpoint, args.step)
        if decoder_only_of(meta, params):
            raise UserError(f"{args.checkpoint} holds a decoder-only model; HF's T5 is an encoder-decoder, so it "
                            "has no HF T5 form")
        vocab = checkpoint_vocabulary(meta)
        if given is not None and vocab is not None and given.serialized_model != vocab.serialized_model:
            raise UserError(f"--vocab {args.vocab} is not the vocabulary {args.checkpoint} was trained with; drop "
                            "--vocab to export the checkpoint's")
        vocab = vocab or given
    to_hf(config, params, args.out, vocab)
    tokenizer = (" and AutoTokenizer.from_pretrained" if vocab else "; no tokenizer: a params checkpoint records "
                 "no vocabulary, pass --vocab spiece.model to export one")
    print(f"wrote HF {family(config)} checkpoint {args.out} (load with "
          f"{MODEL_CLASSES[family(config)]}.from_pretrained{tokenizer})")


def distill_make_data(args) -> None:
    """Sequence-level distillation data: the teacher decodes a task split, one output line per input."""
    from t5lite.data import tasks
    from t5lite.infer.distillation import data_format, gin_lines, make_distillation_data
    data_format(args.out)
    check_output_file(args.out, "--out")
    task = tasks.get(args.task)
    task.source(args.split)  # an unknown split fails before the teacher is loaded
    config, params, vocab, decoder_only = _load_decoder(args, "--teacher")
    with _progress(args.max_examples or 0, f"teacher {args.task}/{args.split}") as bar:
        made = make_distillation_data(config, params, vocab, task, args.split, args.out, name=args.name,
                                      max_examples=args.max_examples, batch_size=args.batch_size,
                                      input_length=args.input_length, max_decode_length=args.max_decode_length,
                                      strict=args.strict, decoder_only=decoder_only, progress=bar,
                                      **_decode_kwargs(args))
    split = made.splits[0]
    print(f"wrote {len(made.source(split))} (input, teacher output) pairs to {args.out}; train a student on them "
          f"with these gin lines:\n{gin_lines(made.name, split, args.out)}")


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


def bench_cards(args) -> None:
    from t5lite.bench.cards import cards_decode_benchmark
    _write_json(args.json, cards_decode_benchmark(args.model, args.batch_size, args.num_cards, args.rank,
                                                  args.input_length, args.max_decode_length, args.method,
                                                  args.repeats))


def bench_data(args) -> None:
    from t5lite.bench import data_benchmark
    data_benchmark(args.task, args.batch_size, args.input_length, args.num_batches, pack=not args.no_pack)


def run_compile(args) -> None:
    """Compiles the gin run for a TPU topology; prints memory per chip (fits?), FLOPs, collectives, warnings."""
    from t5lite import gin_utils
    from t5lite.compile import aot
    if not args.gin_file:
        raise UserError("give at least one --gin_file (e.g. experiments/pretrain/t5_1_1_base_c4.gin)")
    topology = aot.parse_topology(args.topology)  # a typo fails before any gin parsing
    gin_utils.parse(args.gin_file, list(args.gin), "(t5lite compile: no model_dir)")
    train = gin_utils.train_config()
    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    report = aot.compile_run(train, topology, programs=programs, batch_size=args.batch_size,
                             decode_batch=args.decode_batch, decode_input_length=args.decode_input_length,
                             max_decode_length=args.max_decode_length, decode_method=args.decode_method,
                             num_beams=args.num_beams, hlo_dir=args.hlo_dir)
    if args.max_batch:
        report["largest_batch"] = aot.search_batch(train, topology, start=report["batch_size"],
                                                   max_compiles=args.max_batch_compiles)
    print(json.dumps(report, indent=1) if args.json else aot.format_report(report))


def _card_and_base(args):
    """(card, base config, base params) of `cards merge|info --base`: the card's recorded base by default."""
    from t5lite.train.cards import load_card
    from t5lite.train.checkpoint import load_any_params
    card = load_card(args.card)
    base = args.base or card.base_checkpoint
    if not base:
        raise UserError(f"card {card.path} does not record its base checkpoint; pass --base DIR")
    config, params = load_any_params(base)
    return card, base, config, params


def cards_info(args) -> None:
    """Rank, alpha, targets, adapted projections, size and the base a card belongs to."""
    from t5lite.model import abstract_params, count_params
    from t5lite.train.cards import load_card
    card = load_card(args.card)
    base_params = count_params(abstract_params(card.model.replace(scan_layers=False), card.decoder_only))
    modules = sorted({"/".join(p.split("/")[-3:-1]) for p in _card_paths(card)})
    size = sum(os.path.getsize(os.path.join(card.path, f)) for f in os.listdir(card.path))
    info = {"card": card.path, "rank": card.spec.rank, "alpha": card.spec.alpha, "scale": card.spec.scale,
            "dropout": card.spec.dropout, "targets": list(card.spec.targets), "adapted": len(_card_paths(card)) // 2,
            "modules": modules, "params": card.num_params, "base_params": base_params,
            "trainable_fraction": card.num_params / base_params, "bytes_on_disk": size,
            "base_fingerprint": card.base_fingerprint, "base_checkpoint": card.base_checkpoint, "task": card.task,
            "step": card.step}
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"card         {card.path}\n"
          f"rank {card.spec.rank}, alpha {card.spec.alpha:g} (scale {card.spec.scale:g}), dropout {card.spec.dropout:g}\n"
          f"targets      {', '.join(card.spec.targets)}: {info['adapted']} projections ({', '.join(modules)})\n"
          f"params       {card.num_params:,} ({100 * info['trainable_fraction']:.3f} % of the base's "
          f"{base_params:,}); {size / 2**20:.2f} MiB on disk\n"
          f"base         fingerprint {card.base_fingerprint}, checkpoint {card.base_checkpoint}\n"
          f"trained on   {card.task} for {card.step} steps")


def _card_paths(card):
    from t5lite.model import lora
    return list(lora.flat_paths(card.params))


def cards_merge(args) -> None:
    """Folds a card into its base (W + alpha/r A B) and writes an ordinary params checkpoint."""
    from t5lite.model import lora
    from t5lite.train.cards import card_for
    from t5lite.train.checkpoint import save_params
    check_output_dir(args.out, "--out")
    card, base, config, params = _card_and_base(args)
    merged = lora.merge(params, card_for(card, config, params, base), card.spec)
    save_params(args.out, config, merged)
    print(f"wrote params checkpoint {args.out}: {base} with card {card.path} merged")


def cards_export(args) -> None:
    """A card as an HF PEFT LoRA adapter (load it with PeftModel.from_pretrained on the to-hf base)."""
    from t5lite.convert.peft import export_peft
    from t5lite.train.cards import load_card
    check_output_dir(args.out, "--out")
    card = load_card(args.card)
    export_peft(card, args.out, args.base_model_name_or_path)
    print(f"wrote PEFT adapter {args.out} (PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained"
          f"(<base exported with t5lite convert to-hf>), {args.out!r}))")


def list_recipes(args) -> None:
    """`t5lite recipes`: each shipped gin / sweep file with the first line of its header comment."""
    from t5lite import gin_utils
    recipes = gin_utils.shipped_recipes()
    if args.paths:
        print("\n".join(recipes))
        return
    print(f"{len(recipes)} shipped recipes in {gin_utils.RECIPES_DIR}; use one from any directory as "
          "--gin_file=models/tiny.gin, or in a gin file as include 'models/tiny.gin':")
    width = max(len(r) for r in recipes)
    for recipe in recipes:
        print(f"  {recipe:<{width}}  {gin_utils.recipe_summary(recipe)}".rstrip())
