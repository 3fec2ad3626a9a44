"""What users rely on: checkpoints are never lost, mistakes fail early in one line, nothing is half-written.

Each test is a case a user hit: resuming with a changed model, a damaged latest checkpoint, two
runs into one model_dir, a malformed validation file, bad numbers, a prefix-LM setting that
disagrees with the features, fine-tuning from another model size, exporting a training run.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from t5lite.cli import main
from t5lite.errors import UserError

QUICK = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "--gin.train.log_period=2",
         "--gin.train.progress='off'"]


def _train(model_dir, *flags, steps=4, period=2):
    return main(["train", *QUICK, f"--model_dir={model_dir}", f"--gin.TRAIN_STEPS={steps}",
                 f"--gin.CHECKPOINT_PERIOD={period}", *flags])


def _one_line_error(argv, capsys, *needles, code=2):
    """Runs the CLI in process: exit `code`, and the last stderr line is the error naming every needle."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("t5lite: error: "), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


def _snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _steps(model_dir):
    return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    model_dir = tmp_path_factory.mktemp("safety") / "run"
    assert _train(model_dir) == 0
    return model_dir


def test_resuming_with_a_changed_model_fails_and_touches_nothing(trained, tmp_path, capsys):
    model_dir = tmp_path / "run"
    shutil.copytree(trained, model_dir)
    before = _snapshot(model_dir)
    line = _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8",
                            "--gin.T5Config.emb_dim=128"], capsys,
                           "does not fit the configured model", "emb_dim 64 there, 128 here", "--model_dir")
    assert "kernel" in line or "embedding" in line or "scale" in line  # names the differing parameter
    assert _snapshot(model_dir) == before  # byte-identical: nothing deleted, overwritten or added


def test_a_changed_optimizer_is_a_config_error_too(trained, tmp_path, capsys):
    model_dir = tmp_path / "run"
    shutil.copytree(trained, model_dir)
    before = _snapshot(model_dir)
    _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8",
                     "--gin.train.optimizer='adamw'"], capsys, "does not fit", "opt_state")
    assert _snapshot(model_dir) == before


def _damage(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")


def test_damaged_latest_step_every_reader_falls_back_and_training_continues_past_it(trained, tmp_path, capsys):
    from t5lite.train.checkpoint import load_train_checkpoint_params
    model_dir = tmp_path / "run"
    shutil.copytree(trained, model_dir)
    _damage(model_dir / "checkpoints" / "4")
    _, params, _ = load_train_checkpoint_params(str(model_dir))
    _, step2, _ = load_train_checkpoint_params(str(model_dir), step=2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(step2)):
        np.testing.assert_array_equal(a, b)

    (tmp_path / "in.txt").write_text("a verse\n")
    assert main(["infer", "--checkpoint", str(model_dir), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out.jsonl"), "--max_decode_length", "4"]) == 0
    assert main(["convert", "to-hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "hf")]) == 0

    # Training resumes from step 2, sets step 4 aside (kept) and writes a new step 4 without colliding.
    assert _train(model_dir, steps=6) == 0
    assert _steps(model_dir) == [4, 6]
    assert os.path.isdir(model_dir / "checkpoints" / "4.unreadable")
    # A second run finds nothing to do and keeps everything.
    assert _train(model_dir, steps=6) == 0 and _steps(model_dir) == [4, 6]


def test_a_live_model_dir_is_locked_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    import subprocess
    import sys
    from t5lite.train.lock import LOCK_NAME, ModelDirLock
    with ModelDirLock(str(tmp_path)):
        with pytest.raises(UserError, match="in use by another run"):
            with ModelDirLock(str(tmp_path)):
                pass
    assert not (tmp_path / LOCK_NAME).exists()  # released

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                  "start_time": None, "since": "earlier"}))
    with ModelDirLock(str(tmp_path)):  # the holder has exited: taken over with a warning
        pass
    assert any("no longer alive" in r.getMessage() for r in caplog.records)

    other_host = {"pid": 1, "host": "elsewhere", "start_time": None, "since": "now"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(UserError, match="elsewhere"):  # fresh heartbeat from another host: live
        with ModelDirLock(str(tmp_path)):
            pass
    os.utime(tmp_path / LOCK_NAME, (0, 0))  # its heartbeat stopped long ago: stale
    with ModelDirLock(str(tmp_path)):
        pass


@pytest.mark.slow
def test_a_second_run_into_a_live_model_dir_fails_at_once(tmp_path, capsys):
    import subprocess
    import sys
    import time
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "t5lite.cli", "train", *QUICK, f"--model_dir={model_dir}",
           "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (model_dir / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        lines_before = len((model_dir / "metrics.jsonl").read_text().splitlines())
        _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=4"], capsys,
                        "in use by another run", f"pid {first.pid}")
        assert first.poll() is None  # the first run is unharmed
    finally:
        first.terminate()
        assert first.wait(timeout=120) == 0  # SIGTERM: saves and exits cleanly
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) >= lines_before  # no duplicate steps from the second run


@pytest.mark.parametrize("flag, needle", [
    ("--gin.TRAIN_STEPS=-5", "train.train_steps (TRAIN_STEPS) must be an integer >= 1"),
    ("--gin.TRAIN_STEPS=2.5", "got 2.5"),
    ("--gin.BATCH_SIZE=0", "BATCH_SIZE"),
    ("--gin.train.learning_rate=-1.0", "learning_rate"),
    ("--gin.train.num_microbatches=3", "does not divide BATCH_SIZE"),
])
def test_bad_numbers_fail_before_anything_is_written(tmp_path, capsys, flag, needle):
    model_dir = tmp_path / "run"
    _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", flag], capsys, needle)
    assert not model_dir.exists()


def test_a_malformed_validation_file_fails_before_the_first_step(tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("".join(f"question {i}\tanswer {i}\n" for i in range(40)))
    (tmp_path / "dev.tsv").write_text("question\tanswer\nno tab on this line\n")
    model_dir = tmp_path / "run"
    _one_line_error(["train", "--gin_file=experiments/finetune/tsv_task.gin", "--gin_file=experiments/models/tiny.gin",
                     f"--gin.TSV_TRAIN={tmp_path / 'train.tsv'}", f"--gin.TSV_VALIDATION={tmp_path / 'dev.tsv'}",
                     "--gin.EVAL_PERIOD=1000", "--gin.INITIAL_CHECKPOINT_PATH=None", f"--model_dir={model_dir}",
                     "--gin.TRAIN_STEPS=3", "--gin.train.progress='off'"], capsys, "dev.tsv:2")
    assert not model_dir.exists()


def test_decoder_only_prefix_lm_must_agree_with_the_features(tmp_path, capsys):
    model_dir = tmp_path / "run"
    _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.train.decoder_only=True"], capsys,
                    "decoder_only_prefix_lm is False")
    _one_line_error(["train", *QUICK, f"--model_dir={model_dir}", "--gin.T5Config.decoder_only_prefix_lm=True"],
                    capsys, "applies to decoder-only models")
    assert not model_dir.exists()


def test_finetuning_from_another_model_size_is_one_line(trained, tmp_path, capsys):
    _one_line_error(["finetune", "--gin_file=experiments/demo/finetune_en_es.gin", f"--model_dir={tmp_path / 'ft'}",
                     f"--init_checkpoint={trained}", "--gin.TRAIN_STEPS=2"], capsys,
                    f"initial checkpoint {trained} does not fit", "emb_dim 64 there, 128 here")
    assert not (tmp_path / "ft").exists()


def test_infer_keeps_blank_lines_and_rejects_non_utf8_with_the_line(trained, tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(b"first verse\n\n   \nlast verse\n")
    out = tmp_path / "out.jsonl"
    assert main(["infer", "--checkpoint", str(trained), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--max_decode_length", "4", "--batch_size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in records] == ["first verse", "", "   ", "last verse"]
    assert records[1]["output"] == records[2]["output"] == "" and records[1]["score"] is None
    assert records[0]["score"] is not None

    (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9 latin-1\n")
    _one_line_error(["infer", "--checkpoint", str(trained), "--input", str(tmp_path / "bad.txt"), "--output",
                     str(tmp_path / "bad.jsonl")], capsys, "bad.txt:2: not valid UTF-8", "--encoding_errors replace")
    assert not (tmp_path / "bad.jsonl").exists()
    assert main(["infer", "--checkpoint", str(trained), "--input", str(tmp_path / "bad.txt"), "--output",
                 str(tmp_path / "bad.jsonl"), "--encoding_errors", "replace", "--max_decode_length", "2"]) == 0
    assert json.loads((tmp_path / "bad.jsonl").read_text().splitlines()[1])["input"] == "caf\ufffd latin-1"


def test_convert_to_hf_exports_a_training_run_and_round_trips(trained, tmp_path):
    from t5lite.convert.hf import from_hf
    from t5lite.model import EncoderDecoder
    from t5lite.train.checkpoint import load_train_checkpoint_params
    assert main(["convert", "to-hf", "--checkpoint", str(trained), "--step", "2", "--out", str(tmp_path / "hf")]) == 0
    config, params, _ = load_train_checkpoint_params(str(trained), step=2)
    hf_config, hf_params = from_hf(str(tmp_path / "hf"))
    tokens = np.array([[37, 423, 9, 1, 0]], np.int32)
    logits = [EncoderDecoder(c).apply({"params": p}, tokens, tokens) for c, p in ((config, params),
                                                                                  (hf_config, hf_params))]
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))


def test_damaged_safetensors_are_one_line(tmp_path, capsys):
    source = tmp_path / "hf"
    os.makedirs(source)
    (source / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 32, "d_model": 8,
                                                    "num_heads": 2, "d_kv": 4, "d_ff": 16, "num_layers": 1}))
    header = json.dumps({"shared.weight": {"dtype": "F32", "shape": [32, 8], "data_offsets": [0, 1024]}}).encode()
    (source / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    _one_line_error(["convert", "from-hf", "--hf_dir", str(source), "--out", str(tmp_path / "a")], capsys,
                    "model.safetensors is not a readable safetensors file", "truncated")
    (source / "model.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(["convert", "from-hf", "--hf_dir", str(source), "--out", str(tmp_path / "b")], capsys,
                    "not a readable safetensors file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_decoder_only_checkpoints_infer_and_refuse_hf_export(tmp_path, capsys):
    model_dir = tmp_path / "lm"
    assert main(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2",
                 "--gin.train.decoder_only=True", "--gin.T5Config.decoder_only_prefix_lm=True"]) == 0
    (tmp_path / "in.txt").write_text("In the beginning\n")
    assert main(["infer", "--checkpoint", str(model_dir), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out.jsonl"), "--max_decode_length", "3"]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["input"] == "In the beginning"
    _one_line_error(["convert", "to-hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "hf")], capsys,
                    "decoder-only")


def test_gin_errors_name_the_users_file_and_line_and_other_errors_are_not_gin(tmp_path, capsys):
    from t5lite import gin_utils
    (tmp_path / "run.gin").write_text("include 'demo/pretrain.gin'\nTRAIN_STEPS = 3\ntrain.batch_size = (2,\n"
                                      "train.seed = 1\n")
    _one_line_error(["train", f"--gin_file={tmp_path / 'run.gin'}", f"--model_dir={tmp_path / 'run'}"], capsys,
                    f"{tmp_path / 'run.gin'}:4:", "syntax error")

    def raises_user_code_error():
        raise ValueError("a missing value in user code")
    with pytest.raises(ValueError, match="a missing value in user code"):
        gin_utils.call_configured(raises_user_code_error)
