"""`t5lite train / finetune / eval / infer` end to end on the tiny model, and their one-line errors."""

import json
import os

import pytest

from t5lite.cli import main

QUICK = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "--gin.train.log_period=2",
         "--gin.train.progress='off'"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cli") / "pretrain"
    assert main(["train", *QUICK, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=3"]) == 0
    return model_dir


def test_train_writes_checkpoints_tensorboard_metrics_and_config(pretrained):
    assert sorted(os.listdir(pretrained / "checkpoints")) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(pretrained / "tensorboard" / "train"))
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "learning_rate", "tokens_per_sec", "mfu"):
        assert key in records[-1]
    assert "train.train_steps = %TRAIN_STEPS" in (pretrained / "config.gin").read_text()
    assert "TRAIN_STEPS = 6" in (pretrained / "operative_config.gin").read_text()


def test_finetune_eval_and_infer(pretrained, tmp_path, capsys):
    finetuned = tmp_path / "finetune"
    assert main(["finetune", "--gin_file=experiments/demo/finetune_en_es.gin", "--gin_file=experiments/models/tiny.gin",
                 f"--model_dir={finetuned}", f"--init_checkpoint={pretrained}", "--gin.TRAIN_STEPS=4",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}", "--gin.train.progress='off'"]) == 0
    assert os.listdir(finetuned / "checkpoints") == ["4"]
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(finetuned), "--task", "bible_translate_en_es", "--max_examples", "6",
                 "--batch_size", "4", "--max_decode_length", "8", "--output", str(tmp_path / "preds.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_examples"] == 6 and {"bleu", "chrf", "perplexity"} <= set(result)
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 6

    (tmp_path / "in.jsonl").write_text('{"inputs": "translate English to Spanish: God is love."}\n'
                                       '{"inputs": "translate English to Spanish: Hello."}\n')
    assert main(["infer", "--checkpoint", str(finetuned), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--method", "beam", "--num_beams", "2", "--max_decode_length", "6"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["input"] for o in out] == ["translate English to Spanish: God is love.",
                                         "translate English to Spanish: Hello."]
    assert all(isinstance(o["output"], str) and o["score"] <= 0 for o in out)


def test_print_config_shows_bindings_and_the_last_flag_wins(capsys):
    assert main(["train", *QUICK, "--model_dir=unused", "--gin.TRAIN_STEPS=7", "--gin.TRAIN_STEPS=9",
                 "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "TRAIN_STEPS = 9" in out and "T5Config.emb_dim = 64" in out
    assert not os.path.exists("unused")


def _one_line_error(argv, capsys, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t5lite: error: ") and expected in err[0], err


def test_bad_binding_is_one_line_with_suggestions(capsys, tmp_path):
    _one_line_error(["train", *QUICK, f"--model_dir={tmp_path}", "--gin.train.batch_sise=4"], capsys,
                    "did you mean train.batch_size")
    _one_line_error(["train", *QUICK, f"--model_dir={tmp_path}", "--gin.TRAIN_STEP=4"], capsys,
                    "did you mean TRAIN_STEPS")


def test_missing_gin_file_and_unknown_task(capsys, tmp_path):
    _one_line_error(["train", "--gin_file=experiments/demo/nope.gin", f"--model_dir={tmp_path}"], capsys, "not found")
    _one_line_error(["train", *QUICK, f"--model_dir={tmp_path / 'x'}", "--gin.TRAIN_STEPS=2",
                     "--gin.MIXTURE_OR_TASK_NAME=bible_translate_en_fr"], capsys, "bible_translate_en_es")
    assert not os.path.exists(tmp_path / "x" / "checkpoints")


def test_finetune_needs_an_existing_checkpoint(capsys, tmp_path):
    _one_line_error(["finetune", "--gin_file=experiments/demo/finetune_en_es_scratch.gin", f"--model_dir={tmp_path}"],
                    capsys, "needs a checkpoint")
    _one_line_error(["finetune", "--gin_file=experiments/demo/finetune_en_es.gin", f"--model_dir={tmp_path}",
                     f"--init_checkpoint={tmp_path / 'missing'}"], capsys, "does not exist")
