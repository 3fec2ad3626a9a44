"""A fuzzer for the command line: hypothesis drives the real entry point (t5lite.cli.main, in process) with
generated flag values, gin bindings, paths and file contents on the tiny model. For every case: no
exception escapes (no traceback), the exit code is 0 or 2, an error is exactly one line, and nothing under
an existing model_dir changes when the command fails.

The default profile runs in `make test` (a few dozen cases, derandomized: the same cases every run); the
`extended` tests run many more for `make test-all`. Left out on purpose, as the training side's own cases
(tests of the trainer): resuming with another seed or task, SIGINT, disk full, out of memory in training,
the dropout range and a read-only model_dir. Decoding values that are valid but huge (--max_decode_length
or --num_beams in the millions) are left out too: they are honoured, and would only take long.
"""

import contextlib
import io
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t5lite.cli import main
from tests.conftest import tree_digest

DEFAULT, DEEP = 20, 400  # cases per fuzz test: make test / make test-all


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def run_cli(argv, guarded=()) -> int:
    """Runs `t5lite argv` in process and checks the contract; returns the exit code."""
    before = {path: tree_digest(path) for path in guarded}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])  # an exception here is the traceback a user would see
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert code in (0, 2), (argv, code, text)
    if code == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1, (argv, text)
        for path, digest in before.items():
            assert tree_digest(path) == digest, f"{argv} failed but changed {path}"
    return code


# Values: valid small ones and every kind of invalid one (zero, negative, non-finite, not a number, huge).
ODD_NUMBERS = st.sampled_from(["0", "-1", "-3", "nan", "inf", "-inf", "1e400", "x", "", "1.5", "0x10", "٣",
                               "99999999999999999999"])
SMALL_INTS = st.integers(1, 4).map(str)
NUMBER_FLAGS = {  # flag: its valid values
    "--batch_size": SMALL_INTS, "--input_length": st.sampled_from(["1", "2", "8", "64", "100000"]),
    "--max_decode_length": st.sampled_from(["1", "2", "3"]), "--num_beams": st.sampled_from(["1", "2"]),
    "--length_penalty": st.sampled_from(["0", "-2.5", "1", "3e2"]), "--temperature": st.sampled_from(["0.1", "5"]),
    "--top_k": st.sampled_from(["0", "1", "8192", "8193", "100000"]), "--top_p": st.sampled_from(["0.5", "1"]),
    "--seed": st.sampled_from(["0", "7"]), "--max_batch_tokens": st.sampled_from(["1", "64", "100000"]),
    "--max_examples": st.sampled_from(["1", "3"]),
}


@st.composite
def decoding_flags(draw):
    flags = []
    for flag in draw(st.lists(st.sampled_from(sorted(NUMBER_FLAGS)), max_size=4, unique=True)):
        flags += [flag, draw(st.one_of(NUMBER_FLAGS[flag], ODD_NUMBERS))]
    flags += ["--method", draw(st.sampled_from(["greedy", "beam", "sample", "nucleus"]))]
    return flags


def _fuzz_decoding_flags(runs, tmp_path, n):
    @_settings(n)
    @given(flags=decoding_flags(), command=st.sampled_from(["infer", "eval"]))
    def case(flags, command):
        if command == "infer":
            argv = ["infer", "--checkpoint", runs / "trained", "--input", runs / "in.txt", "--output",
                    tmp_path / "out.jsonl"]
        else:
            argv = ["eval", "--checkpoint", runs / "trained", "--task", "bible_translate_en_es", "--max_examples", "2"]
        run_cli(argv + ["--max_decode_length", "2"] + flags, guarded=[runs / "trained"])
    case()


def test_fuzz_decoding_flags(cli_runs, tmp_path):
    _fuzz_decoding_flags(cli_runs, tmp_path, DEFAULT)


@pytest.mark.extended
def test_fuzz_decoding_flags_deep(cli_runs, tmp_path):
    _fuzz_decoding_flags(cli_runs, tmp_path, DEEP)


# Input files: empty, binary, huge lines, non-UTF-8, JSONL with wrong keys or types, TSV-like columns.
CONTENTS = st.one_of(
    st.just(b""), st.just(b"\n\n\n"), st.binary(max_size=64), st.just(b"\xff\xfe\x00bad latin1 \xe9\n"),
    st.just(("word " * 20000).encode() + b"\n"), st.just(b"a\tb\tc\n\td\n"),
    st.just(b'{"inputs": "hello"}\n{"other": 1}\n'), st.just(b'{"inputs": 5}\n[1, 2]\nnull\n"str"\n'),
    st.just(b'{"inputs": "x", "card": "nope"}\n'), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _fuzz_input_files(runs, tmp_path, n):
    @_settings(n)
    @given(content=CONTENTS, suffix=st.sampled_from([".txt", ".jsonl", ".tsv"]),
           extra=st.sampled_from([[], ["--encoding_errors", "replace"], ["--strict"], ["--input_key", "other"]]))
    def case(content, suffix, extra):
        path = tmp_path / f"input{suffix}"
        path.write_bytes(content)
        run_cli(["infer", "--checkpoint", runs / "trained", "--input", path, "--output", tmp_path / "out.jsonl",
                 "--max_decode_length", "2", "--input_length", "16", *extra], guarded=[runs / "trained"])
    case()


def test_fuzz_input_files(cli_runs, tmp_path):
    _fuzz_input_files(cli_runs, tmp_path, DEFAULT)


@pytest.mark.extended
def test_fuzz_input_files_deep(cli_runs, tmp_path):
    _fuzz_input_files(cli_runs, tmp_path, DEEP)


# Paths: missing, a directory, a file where a directory is wanted, under a file, the input itself, a card run.
PATH_KINDS = ["missing", "dir", "file", "under_file", "input", "card_run", "empty_dir", "new_parent"]


def _path(kind, runs, tmp_path):
    shutil.copy(runs / "in.txt", tmp_path / "in.txt")  # the input file of each case (eval may overwrite it)
    (tmp_path / "a_dir").mkdir(exist_ok=True)
    (tmp_path / "a_dir" / "x").write_text("x")
    (tmp_path / "empty_dir").mkdir(exist_ok=True)
    (tmp_path / "a_file").write_text("x")
    return {"missing": tmp_path / "missing", "dir": tmp_path / "a_dir", "file": tmp_path / "a_file",
            "under_file": tmp_path / "a_file" / "x", "input": tmp_path / "in.txt", "card_run": runs / "card_run",
            "empty_dir": tmp_path / "empty_dir", "new_parent": tmp_path / "new" / "out"}[kind]


def _fuzz_paths(runs, tmp_path, n):
    guarded = [runs / "trained", runs / "card_run", runs / "base"]

    @_settings(n)
    @given(command=st.sampled_from(["infer", "eval", "to-hf", "from-hf", "merge", "make-data", "vocab"]),
           first=st.sampled_from(PATH_KINDS + ["trained", "base"]), second=st.sampled_from(PATH_KINDS))
    def case(command, first, second):
        work = tmp_path / "case"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        a = runs / first if first in ("trained", "base") else _path(first, runs, work)
        b = _path(second, runs, work)
        text = work / "in.txt"
        argv = {"infer": ["infer", "--checkpoint", a, "--input", text, "--output", b, "--max_decode_length", "1"],
                "eval": ["eval", "--checkpoint", a, "--task", "bible_translate_en_es", "--max_examples", "1",
                         "--max_decode_length", "1", "--output", b],
                "to-hf": ["convert", "to-hf", "--checkpoint", a, "--out", b],
                "from-hf": ["convert", "from-hf", "--hf_dir", a, "--out", b],
                "merge": ["cards", "merge", a, "--out", b],
                "make-data": ["distill", "make-data", "--teacher", a, "--task", "bible_translate_en_es",
                              "--max_examples", "1", "--max_decode_length", "1", "--out", f"{b}.jsonl"],
                "vocab": ["vocab", "train", "--input", a, "--vocab_size", "150", "--out", b]}[command]
        before = text.read_bytes()
        run_cli(argv, guarded=guarded)
        if command == "infer":
            assert text.read_bytes() == before  # never the output, even when named as it
    case()


def test_fuzz_paths(cli_runs, tmp_path):
    _fuzz_paths(cli_runs, tmp_path, DEFAULT)


@pytest.mark.extended
def test_fuzz_paths_deep(cli_runs, tmp_path):
    _fuzz_paths(cli_runs, tmp_path, DEEP)


# Gin bindings with odd values, into a copy of an existing run (resuming it, or failing with it untouched).
GIN_KEYS = ["T5Config.num_heads", "T5Config.emb_dim", "BATCH_SIZE", "train.learning_rate", "train.log_period",
            "CHECKPOINT_PERIOD", "T5Config.vocab_size", "TASK_FEATURE_LENGTHS", "train.optimizer", "NO_SUCH_MACRO",
            "train.no_such_arg", "T5Config.position_scheme", "train.loss"]
GIN_VALUES = ["-1", "0", "nan", "'x'", "None", "[]", "{}", "%UNDEFINED", "@nothing()", "(", "True", "1e10", "''",
              "{'inputs': -1, 'targets': 8}", "{'inputs': 8}", "\"a\nb\""]


def _fuzz_gin(runs, tmp_path, n):
    model_dir = tmp_path / "resumed"
    shutil.copytree(runs / "trained", model_dir)

    @_settings(n)
    @given(bindings=st.lists(st.tuples(st.sampled_from(GIN_KEYS), st.sampled_from(GIN_VALUES)), min_size=1,
                             max_size=2),
           command=st.sampled_from(["train", "finetune"]))
    def case(bindings, command):
        argv = [command, "--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.progress='off'",
                "--gin.EVAL_PERIOD=None", "--gin.TRAIN_STEPS=2", f"--model_dir={model_dir}"]
        argv += [f"--gin.{key}={value}" for key, value in bindings]
        if command == "finetune":
            argv.append(f"--init_checkpoint={runs / 'base'}")
        run_cli(argv, guarded=[model_dir, runs / "base"])
    case()


def test_fuzz_gin_bindings(cli_runs, tmp_path):
    _fuzz_gin(cli_runs, tmp_path, DEFAULT)


@pytest.mark.extended
def test_fuzz_gin_bindings_deep(cli_runs, tmp_path):
    _fuzz_gin(cli_runs, tmp_path, DEEP)


# Sweeps: odd grids, seeds and roots (the dry run, the command lines and the summary plan without training).
GRID_VALUES = ["[0,-2]", "[64]", "[]", "[", "1", "['x']", "[None]", "[1e400]", "[True]", "[64,64]"]


def _fuzz_sweep(runs, tmp_path, n):
    (tmp_path / "a_file").write_text("x")

    @_settings(n)
    @given(axis=st.sampled_from(["T5Config.emb_dim", "T5Config.num_heads", "TRAIN_STEPS", "nonsense", "", "="]),
           values=st.sampled_from(GRID_VALUES), seeds=st.sampled_from([[], ["--seeds", "2"], ["--seeds", "0"]]),
           action=st.sampled_from([["run", "--dry_run"], ["run", "--print_commands"], ["summary"]]),
           root=st.sampled_from(["new", "a_file", "trained"]))
    def case(axis, values, seeds, action, root):
        where = runs / "trained" if root == "trained" else tmp_path / root
        run_cli(["sweep", *action, "--root", where, "--gin_file=experiments/demo/pretrain.gin",
                 "--gin_file=experiments/models/tiny.gin", "--grid", f"{axis}={values}", *seeds],
                guarded=[runs / "trained"])
        assert not (tmp_path / "new").exists()  # planning creates no directory
    case()


def test_fuzz_sweep(cli_runs, tmp_path):
    _fuzz_sweep(cli_runs, tmp_path, DEFAULT)


@pytest.mark.extended
def test_fuzz_sweep_deep(cli_runs, tmp_path):
    _fuzz_sweep(cli_runs, tmp_path, DEEP)
