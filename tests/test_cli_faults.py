"""The inference side of the CLI under bad inputs: token-budget batching (memory of one long line),
flag ranges, output paths checked before any work, card runs where a model is asked for, another
vocabulary, sweep mistakes, and the HF export's file modes and tokenizer.

Each case failed before its fix (a traceback, a silent wrong result or a filled host)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite.cli import main
from t5lite.data import tasks
from t5lite.infer import generate
from t5lite.infer import evaluate
from t5lite.infer.evaluate import decode_texts, pad_inputs
from t5lite.model import get_config, init_params
from tests.conftest import CARD_RUN, QUICK, tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def runs(cli_runs):
    """base (params checkpoint), trained (2-step run), card_run (2-step LoRA run on base), in.txt: conftest.py."""
    return cli_runs


def _fails_in_one_line(argv, capsys, *expected):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


# --- 1. Token-budget batching ---------------------------------------------------------------------


def test_a_long_line_is_batched_alone_and_short_ones_together():
    lengths = [5] * 31 + [4000]
    plan = evaluate.token_budget_batches(lengths, batch_size=32, input_length=4096)  # budget 32 x 128 tokens
    assert sorted(i for ids, _, _ in plan for i in ids) == list(range(32))
    shapes = sorted((len(ids), rows, length) for ids, rows, length in plan)
    assert shapes == [(1, 1, 4096), (31, 32, 16)]
    # A budget: 10 lines of 100 tokens under 256 tokens per batch -> batches of 2 rows padded to 128.
    plan = evaluate.token_budget_batches([100] * 10, batch_size=32, input_length=512, max_batch_tokens=256)
    assert [(len(ids), rows, length) for ids, rows, length in plan] == [(2, 2, 128)] * 5


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", vocab_size=8192)
    return config, init_params(config, jax.random.key(1)), tasks.default_vocabulary()


def test_budget_batches_decode_like_one_example_at_a_time_in_input_order(tiny):
    """The reference: each text decoded alone at the full input length."""
    config, params, vocab = tiny
    texts = ["word " * n for n in (30, 2, 9, 1, 17, 4)] + [""]
    records = decode_texts(config, params, vocab, texts, input_length=48, batch_size=4, max_batch_tokens=64,
                           max_decode_length=5)
    assert [r["input"] for r in records] == texts and records[-1]["output"] == "" and records[-1]["score"] is None
    for text, record in zip(texts[:-1], records):
        row, _ = pad_inputs([vocab.encode(text) + [1]], 48)
        tokens, scores = generate(config, params, row, max_decode_length=5)
        assert record["output"] == vocab.decode(np.asarray(tokens)[0])
        np.testing.assert_allclose(record["score"], np.asarray(scores)[0], rtol=1e-4)


def test_one_long_line_does_not_fill_the_host(runs, tmp_path):
    """Failed before: `--input_length 4096` padded all 32 lines to 4096 tokens ([32, 4, 4096, 4096] float32
    attention scores, 8.6 GB per array) and filled the 24 GB host. Now the long line decodes alone."""
    lines = ["translate English to Spanish: Hello."] * 31 + ["word " * 5000]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    # VmHWM, not getrusage's ru_maxrss: a child started by subprocess inherits its parent's peak RSS in
    # ru_maxrss (the pytest worker's, gigabytes late in the suite), while VmHWM counts this process only.
    script = ("import sys; from t5lite.cli import main; rc = main(sys.argv[1:]); "
              "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
              "sys.exit(rc)")
    argv = ["infer", "--checkpoint", str(runs / "base"), "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "out.jsonl"), "--input_length", "4096", "--max_decode_length", "2"]
    # 8 GB of address space: far below what the old padding needed, far above what one line needs.
    proc = subprocess.run(["bash", "-c", 'ulimit -v 8000000; exec "$@"', "_", sys.executable, "-c", script, *argv],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_gb = int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 2**20
    print(f"peak RSS {peak_gb:.2f} GB")  # README quotes it (pytest -s)
    # The 8 GB cap is the guard (the old padding needed 8.6 GB for one array); alone this run peaks at ~1.6 GB.
    assert peak_gb < 2.5, f"peak RSS {peak_gb:.2f} GB"
    assert "1 of 32 inputs were longer than input_length 4096" in proc.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 32


# --- 2. Flag ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "--batch_size: must be >= 1"),
    (["--batch_size", "-3"], "--batch_size: must be >= 1"),
    (["--input_length", "0"], "--input_length: must be >= 1"),
    (["--max_decode_length", "0"], "--max_decode_length"),
    (["--num_beams", "0"], "--num_beams"),
    (["--length_penalty", "nan"], "--length_penalty: must be a finite number"),
    (["--length_penalty", "inf"], "--length_penalty"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_k", "-1"], "--top_k"),
    (["--max_batch_tokens", "0"], "--max_batch_tokens"),
    (["--batch_size", "x"], "is not an integer"),
])
def test_numeric_flags_are_range_checked_in_one_line(flags, expected, runs, tmp_path, capsys):
    """Before: --batch_size -3 / --length_penalty nan gave every output empty (exit 0), --batch_size 0 and
    --input_length 0 tracebacks."""
    out = tmp_path / "out.jsonl"
    _fails_in_one_line(["infer", "--checkpoint", runs / "base", "--input", runs / "in.txt", "--output", out, *flags],
                       capsys, expected)
    assert not out.exists()


def test_eval_batch_size_and_top_k_beyond_the_vocabulary(runs, capsys):
    _fails_in_one_line(["eval", "--checkpoint", runs / "base", "--task", "bible_translate_en_es", "--batch_size", "-1"],
                       capsys, "--batch_size: must be >= 1")
    _fails_in_one_line(["infer", "--checkpoint", runs / "base", "--input", runs / "in.txt", "--output",
                        runs / "never.jsonl", "--method", "sample", "--top_k", "9000"], capsys,
                       "--top_k 9000 is larger than the vocabulary (8192)")
    assert not (runs / "never.jsonl").exists()


# --- 3. Output paths -------------------------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(runs, tmp_path, capsys):
    before = (runs / "in.txt").read_text()
    _fails_in_one_line(["infer", "--checkpoint", runs / "base", "--input", runs / "in.txt", "--output",
                        runs / "in.txt"], capsys, "is the input file")
    assert (runs / "in.txt").read_text() == before  # before: overwritten, exit 0
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for output, expected in ((tmp_path / "a_dir", "is a directory"), (tmp_path / "a_file" / "out.jsonl", "is a file")):
        _fails_in_one_line(["infer", "--checkpoint", runs / "base", "--input", runs / "in.txt", "--output", output],
                           capsys, expected)
        _fails_in_one_line(["eval", "--checkpoint", runs / "base", "--task", "bible_translate_en_es", "--output",
                            output], capsys, expected)
    _fails_in_one_line(["convert", "to-hf", "--checkpoint", runs / "base", "--out", tmp_path / "a_file"], capsys,
                       "is an existing file")
    assert (tmp_path / "a_file").read_text() == "x"
    _fails_in_one_line(["convert", "to-hf", "--checkpoint", runs / "base", "--out", tmp_path / "a_file" / "hf"],
                       capsys, "is a file, not a directory")
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"]


def test_output_in_a_new_directory_is_created(runs, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    assert main(["infer", "--checkpoint", str(runs / "base"), "--input", str(runs / "in.txt"), "--output", str(out),
                 "--max_decode_length", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2


# --- 4. A LoRA card run where a model is asked for -------------------------------------------------


def test_a_card_run_is_refused_where_a_model_is_asked_for_naming_card(runs, tmp_path, capsys):
    """Before: `ShapeDtypeStruct is not a valid JAX type` tracebacks, and finetune left its model_dir."""
    card_run, digest = runs / "card_run", tree_digest(runs / "card_run")
    _fails_in_one_line(["infer", "--checkpoint", card_run, "--input", runs / "in.txt", "--output",
                        tmp_path / "out.jsonl"], capsys, "is a LoRA card run", "--card")
    _fails_in_one_line(["eval", "--checkpoint", card_run, "--task", "bible_translate_en_es"], capsys, "--card")
    _fails_in_one_line(["finetune", *CARD_RUN[1:], "--gin_file=experiments/demo/finetune_en_es.gin",
                        f"--model_dir={tmp_path / 'ft'}", f"--init_checkpoint={card_run}"], capsys,
                       "--init_checkpoint", "is a LoRA card run")
    _fails_in_one_line(["distill", "train", *QUICK, f"--model_dir={tmp_path / 'student'}", f"--teacher={card_run}"],
                       capsys, "--teacher", "is a LoRA card run")
    _fails_in_one_line(["convert", "to-hf", "--checkpoint", card_run, "--out", tmp_path / "hf"], capsys, "card")
    assert os.listdir(tmp_path) == [] and tree_digest(card_run) == digest
    # The way the message names works: the base with --card.
    assert main(["infer", "--checkpoint", str(runs / "base"), "--card", f"es={card_run}", "--input",
                 str(runs / "in.txt"), "--output", str(tmp_path / "out.jsonl"), "--max_decode_length", "2"]) == 0


# --- 5. Another vocabulary, sweep mistakes ---------------------------------------------------------


def test_infer_refuses_a_vocab_other_than_the_checkpoints(runs, tmp_path, capsys):
    """Before: accepted (its ids mean other pieces); finetune refused the same."""
    from t5lite.data.vocab import train_vocabulary
    (tmp_path / "text.txt").write_text("\n".join(f"line number {i} of a small corpus" for i in range(200)))
    other = train_vocabulary([str(tmp_path / "text.txt")], 140, str(tmp_path / "vocab"))
    _fails_in_one_line(["infer", "--checkpoint", runs / "trained", "--input", runs / "in.txt", "--output",
                        tmp_path / "out.jsonl", "--vocab", other], capsys, "is not the vocabulary")
    assert not (tmp_path / "out.jsonl").exists()


def test_sweep_dry_run_with_invalid_points_and_summary_of_a_missing_root(tmp_path, capsys):
    """Before: the dry run exited 0 with every point invalid; summary created the mistyped root, exit 0."""
    base = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin"]
    err = _fails_in_one_line(["sweep", "run", "--root", tmp_path / "sweep", *base, "--grid",
                              "T5Config.num_heads=[0,-2]", "--dry_run"], capsys, "2 of 2 points cannot run")
    assert "num_heads-0" in err and "num_heads--2" in err
    _fails_in_one_line(["sweep", "summary", "--root", tmp_path / "typo", *base, "--grid", "T5Config.num_heads=[2]"],
                       capsys, "is not a directory")
    # Found by the fuzzer: a TRAIN_STEPS that is not a number was a ValueError traceback while planning.
    _fails_in_one_line(["sweep", "run", "--root", tmp_path / "sweep", *base, "--grid", "TRAIN_STEPS=['x']",
                        "--dry_run"], capsys, "TRAIN_STEPS) must be an integer >= 1, got 'x'")
    assert os.listdir(tmp_path) == []


# --- 6. The HF export: file modes and the tokenizer ------------------------------------------------


def test_to_hf_files_follow_the_umask_and_the_tokenizer_loads_in_transformers(runs, tmp_path, capsys):
    """Before: model.safetensors was mode 0600 and no tokenizer was exported beside it."""
    from transformers import AutoTokenizer
    old_mask = os.umask(0o022)
    try:
        assert main(["convert", "to-hf", "--checkpoint", str(runs / "trained"), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old_mask)
    names = sorted(os.listdir(tmp_path / "hf"))
    assert names == ["config.json", "model.safetensors", "special_tokens_map.json", "spiece.model",
                     "tokenizer_config.json"]
    assert {oct(os.stat(tmp_path / "hf" / n).st_mode & 0o777) for n in names} == {"0o644"}
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    vocab = tasks.default_vocabulary()  # what the trained run stored
    assert len(hf_tokenizer) == vocab.vocab_size
    for text in ("translate English to Spanish: God is love.", "Dios es amor, y el Señor es mi pastor.",
                 "In the beginning God created the heavens and the earth. 1234"):
        assert hf_tokenizer(text).input_ids == vocab.encode(text) + [vocab.eos_id]
    assert hf_tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocab.sentinel_id(0)

    # A params checkpoint records no vocabulary: the tokenizer only with --vocab.
    capsys.readouterr()
    assert main(["convert", "to-hf", "--checkpoint", str(runs / "base"), "--out", str(tmp_path / "p")]) == 0
    assert "pass --vocab" in capsys.readouterr().out and not (tmp_path / "p" / "spiece.model").exists()
    assert main(["convert", "to-hf", "--checkpoint", str(runs / "base"), "--out", str(tmp_path / "pv"), "--vocab",
                 "t5lite/data/corpora/spiece.model"]) == 0
    assert (tmp_path / "pv" / "spiece.model").read_bytes() == vocab.serialized_model


# --- Found by the fuzzer (tests/test_fuzz_cli.py) --------------------------------------------------


@pytest.mark.parametrize("binding, expected", [
    ("T5Config.num_heads={}", "T5Config.num_heads must be an int, got {}"),
    ("T5Config.emb_dim='x'", "T5Config.emb_dim must be an int"),
    ("T5Config.layer_norm_epsilon=nan", "must be a finite float"),
    ("T5Config.num_heads=(", "unclosed bracket or quote"),
    ("train.optimizer=[]", "unknown optimizer []"),
    ("T5Config.attention=[]", "T5Config.attention must be a str"),
])
def test_odd_gin_values_are_one_line_and_leave_the_run_alone(binding, expected, runs, capsys):
    """Before: TypeError '<=' not supported between 'dict' and 'int', tokenize.TokenError, 'unhashable type: list'
    tracebacks (or a nan epsilon accepted)."""
    digest = tree_digest(runs / "trained")
    _fails_in_one_line(["train", *QUICK, f"--model_dir={runs / 'trained'}", f"--gin.{binding}"], capsys, expected)
    assert tree_digest(runs / "trained") == digest
