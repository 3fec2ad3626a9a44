"""Adapter cards end to end: card-only fine-tuning through `t5lite finetune`, what its checkpoints hold,
`t5lite cards info|merge|export` (PEFT parity), `t5lite infer --card` with mixed cards, one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite.cli import main
from t5lite.data import tasks
from t5lite.infer.evaluate import decode_texts, evaluate_task
from t5lite.model import EncoderDecoder, get_config, init_params, lora
from t5lite.train.cards import Card, load_card, save_card
from t5lite.train.checkpoint import load_params, save_params, stored_state_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD_RUN = ["--gin_file=experiments/finetune/lora_en_es.gin", "--gin_file=experiments/models/tiny.gin",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}", "--gin.EVAL_PERIOD=None",
            "--gin.train.log_period=5", "--gin.train.progress='off'", "--gin.train.learning_rate=0.01"]


def _base(path, seed):
    config = get_config("tiny", vocab_size=8192)
    params = jax.jit(lambda k: init_params(config, k))(jax.random.key(seed))
    save_params(str(path), config, params)
    return config, jax.device_get(params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    config, params = _base(root / "base", 0)
    _base(root / "other_base", 1)
    assert main(["finetune", *CARD_RUN, f"--model_dir={root / 'card_run'}", f"--init_checkpoint={root / 'base'}",
                 "--gin.TRAIN_STEPS=30", "--gin.CHECKPOINT_PERIOD=15"]) == 0
    return root, config, params


def _one_line_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5lite: error: ") and "\n" not in err and match in err, err


def test_finetune_trains_only_the_card_and_saves_only_the_card(run):
    root, config, params = run
    losses = [json.loads(line)["loss"] for line in (root / "card_run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0] - 0.1, losses

    # Checkpoints: the card and its optimizer state, nothing shaped like the base.
    card_paths = set(lora.flat_paths(lora.abstract_card(config, lora.LoraConfig(targets=("q", "v")))))
    shapes = stored_state_shapes(str(root / "card_run" / "checkpoints" / "30"))
    assert {p[len("params/"):] for p in shapes if p.startswith("params/")} == card_paths
    optimizer_leaves = [p for p, shape in shapes.items() if p.startswith("opt_state/") and shape]
    assert optimizer_leaves and all(any(p.endswith(c) for c in card_paths) for p in optimizer_leaves)
    meta = json.load(open(root / "card_run" / "checkpoints" / "30" / "meta" / "metadata"))
    assert meta["card"]["base_fingerprint"] == lora.fingerprint(params, config)

    # The card directory: small, the card alone, and what it was trained on.
    card = load_card(str(root / "card_run"))
    assert (card.spec.rank, card.spec.alpha, card.spec.targets, card.step) == (8, 16.0, ("q", "v"), 30)
    assert card.task == "bible_translate_en_es" and "LoraConfig.rank = 8" in card.gin
    assert card.base_fingerprint == lora.fingerprint(params, config)
    assert card.num_params == 6 * 2 * 8 * (64 + 64)  # 6 attentions x (q, v) x r (d_model + heads * head_dim)
    size = sum(f.stat().st_size for f in (root / "card_run" / "card").iterdir())
    assert size < card.num_params * 4 + 20_000
    assert any(np.any(b != 0) for p, b in lora.flat_paths(card.params).items() if p.endswith("lora_b"))
    # The base is untouched.
    _, stored = load_params(str(root / "base"))
    for path, value in lora.flat_paths(params).items():
        np.testing.assert_array_equal(lora.flat_paths(stored)[path], value)


def test_resuming_a_card_run_on_another_base_fails_in_one_line(run, capsys):
    root, _, _ = run
    before = sorted(os.listdir(root / "card_run" / "checkpoints"))
    _one_line_error(["finetune", *CARD_RUN, f"--model_dir={root / 'card_run'}",
                     f"--init_checkpoint={root / 'other_base'}", "--gin.TRAIN_STEPS=40"], capsys,
                    "holds a card trained on another base")
    assert sorted(os.listdir(root / "card_run" / "checkpoints")) == before


def test_a_card_with_distillation_is_refused_before_anything_is_written(run, tmp_path, capsys):
    root, _, _ = run
    _one_line_error(["finetune", *CARD_RUN, f"--model_dir={tmp_path / 'run'}", f"--init_checkpoint={root / 'base'}",
                     "--gin.TRAIN_STEPS=5", "--gin.train.loss='distillation'",
                     f"--gin.train.teacher_checkpoint='{root / 'base'}'"], capsys, "cross_entropy loss only")
    assert not (tmp_path / "run").exists()


def test_cards_info_merge_and_the_wrong_base(run, tmp_path, capsys):
    root, config, params = run
    assert main(["cards", "info", str(root / "card_run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 8 and info["targets"] == ["q", "v"] and info["adapted"] == 12
    assert info["params"] == 1536 * 8 and info["base_fingerprint"] == lora.fingerprint(params, config)
    assert "self_attention/query" in info["modules"] and 0 < info["trainable_fraction"] < 0.02

    assert main(["cards", "merge", str(root / "card_run"), "--out", str(tmp_path / "merged")]) == 0
    merged_config, merged = load_params(str(tmp_path / "merged"))
    card = load_card(str(root / "card_run"))
    enc, dec = np.array([[50, 61, 7, 1]]), np.array([[0, 12, 99, 4]])
    model = EncoderDecoder(config)
    with lora.adapted(card.spec):
        adapted = np.asarray(model.apply({"params": params, "lora": card.params}, enc, dec))
    folded = np.asarray(EncoderDecoder(merged_config).apply({"params": merged}, enc, dec))
    np.testing.assert_allclose(folded, adapted, rtol=1e-5, atol=1e-5 * np.abs(adapted).max())

    _one_line_error(["cards", "merge", str(root / "card_run"), "--base", str(root / "other_base"), "--out",
                     str(tmp_path / "wrong")], capsys, "was trained on another base model")
    assert not (tmp_path / "wrong").exists()


def test_infer_mixes_cards_in_one_batch_in_a_fresh_process(run, tmp_path, capsys):
    """Lines with card a, card b, the base: the CLI (a fresh process, one batch) answers each line as the
    merged checkpoint of its card does."""
    root, config, params = run
    card_a = load_card(str(root / "card_run"))
    rng = np.random.default_rng(0)
    b_params = jax.tree.map(lambda x: (x + rng.normal(0, 0.5, x.shape)).astype(np.float32), card_a.params)
    save_card(str(tmp_path / "card_b"), Card(card_a.spec, b_params, card_a.base_fingerprint, config, task="made up"))
    lines = [("In the beginning God created the heaven", "a"), ("And the earth was without form", "b"),
             ("Let there be light", None), ("And God saw the light", "a"), ("and it was good", "base")]
    with open(tmp_path / "in.jsonl", "w") as f:
        for text, card in lines:
            f.write(json.dumps({"inputs": text, **({"card": card} if card else {})}) + "\n")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "t5lite.cli", "infer", "--checkpoint", str(root / "base"), "--input",
               str(tmp_path / "in.jsonl"), "--output", str(out), "--card", f"a={root / 'card_run'}",
               "--card", f"b={tmp_path / 'card_b'}", "--max_decode_length", "8", "--batch_size", "8"]
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["card"] for r in records] == ["a", "b", None, "a", None]

    vocab = tasks.default_vocabulary()
    for name, card in (("a", card_a.params), ("b", b_params), (None, None)):
        merged = params if card is None else lora.merge(params, card, card_a.spec)
        expected = decode_texts(config, merged, vocab, [t for t, _ in lines], max_decode_length=8, batch_size=8)
        for record, want in zip(records, expected):
            if record["card"] == name:
                assert record["output"] == want["output"]
    assert records[0]["output"] != records[1]["output"] or records[0]["output"] != records[2]["output"]

    _one_line_error(["infer", "--checkpoint", str(root / "other_base"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "x.jsonl"), "--card", f"a={root / 'card_run'}", "--card",
                     f"b={tmp_path / 'card_b'}"], capsys, "was trained on another base model")
    _one_line_error(["infer", "--checkpoint", str(root / "base"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "x.jsonl"), "--card", f"a={root / 'card_run'}"], capsys,
                    "card 'b' is not one of the --card names (a)")
    _one_line_error(["infer", "--checkpoint", str(root / "base"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "x.jsonl"), "--card", "a"], capsys, "needs NAME=DIR")
    assert not (tmp_path / "x.jsonl").exists()


def test_eval_with_a_card_scores_the_adapted_model_and_refuses_another_base(run, tmp_path, capsys):
    """`t5lite eval --card`: the metrics and predictions of base + card, which equal those of the merged
    checkpoint (an independent path: W + (alpha/r) A B folded in); on another base, one line, nothing written."""
    root, config, params = run
    flags = ["--task", "bible_translate_en_es", "--split", "validation", "--max_examples", "6", "--batch_size", "4",
             "--input_length", "64", "--max_decode_length", "8"]
    assert main(["eval", "--checkpoint", str(root / "base"), "--card", str(root / "card_run"), *flags,
                 "--output", str(tmp_path / "preds.jsonl")]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert adapted["card"] == str(root / "card_run" / "card") and adapted["num_examples"] == 6
    assert main(["eval", "--checkpoint", str(root / "base"), *flags]) == 0
    base = json.loads(capsys.readouterr().out)
    assert abs(adapted["perplexity"] - base["perplexity"]) > 1.0  # the card is used

    card = load_card(str(root / "card_run"))
    results, records = evaluate_task(config, lora.merge(params, card.params, card.spec),
                                     tasks.get("bible_translate_en_es"), tasks.default_vocabulary(), split="validation",
                                     max_examples=6, batch_size=4, input_length=64, max_decode_length=8)
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert predictions == [r["prediction"] for r in records]
    assert adapted["chrf"] == pytest.approx(results["chrf"])
    assert adapted["perplexity"] == pytest.approx(results["perplexity"], rel=1e-4)

    _one_line_error(["eval", "--checkpoint", str(root / "other_base"), "--card", str(root / "card_run"), *flags,
                     "--output", str(tmp_path / "x.jsonl")], capsys, "was trained on another base model")
    _one_line_error(["eval", "--checkpoint", str(root / "base"), "--card", str(tmp_path), *flags], capsys,
                    "is not an adapter card")
    assert not (tmp_path / "x.jsonl").exists()


def test_peft_export_gives_hf_peft_the_same_logits(tmp_path):
    from peft import PeftModel

    from tests.hf_reference import hf_logits, load_hf, make_hf_checkpoint, random_batch
    make_hf_checkpoint(tmp_path / "hf", untied=True, vocab_size=96, d_model=16, d_kv=4, num_heads=4, d_ff=32,
                       num_layers=2, feed_forward_proj="gated-gelu")
    assert main(["convert", "from-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "base")]) == 0
    config, params = load_params(str(tmp_path / "base"))
    spec = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "k", "v", "o", "wi", "wo"))
    card = jax.jit(lambda k: lora.init_card(config, spec, k))(jax.random.key(0))
    rng = np.random.default_rng(1)
    card = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.3, x.shape).astype(np.float32) if p[-1].key == "lora_b" else np.asarray(x), card)
    save_card(str(tmp_path / "card"), Card(spec, card, lora.fingerprint(params, config), config))
    assert main(["cards", "export", str(tmp_path / "card"), "--out", str(tmp_path / "peft")]) == 0
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]

    enc, dec_in, targets = random_batch(np.random.default_rng(0), 96, [9, 4], [6, 2], 9, 6)
    reference = hf_logits(PeftModel.from_pretrained(load_hf(str(tmp_path / "hf")), str(tmp_path / "peft")).eval(),
                          enc, dec_in)
    with lora.adapted(spec):
        ours = np.asarray(EncoderDecoder(config).apply({"params": params, "lora": card}, enc, dec_in,
                                                       decoder_target_tokens=targets))
    base = hf_logits(load_hf(str(tmp_path / "hf")), enc, dec_in)
    mask = targets > 0
    assert np.abs(reference[mask] - base[mask]).max() > 0.01  # PEFT applied the card
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-4 * np.abs(reference).max(), rtol=1e-4)
