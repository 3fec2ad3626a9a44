"""Batch decoding of texts and task evaluation: order, truncation, metrics and perplexity."""

import math

import jax
import numpy as np
import pytest

from t5lite import metrics
from t5lite.data import tasks
from t5lite.errors import UserError
from t5lite.infer import generate
from t5lite.infer.evaluate import decode_texts, evaluate_task, pad_inputs, target_log_likelihoods
from t5lite.model import EncoderDecoder, get_config, init_params


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny", vocab_size=8192)
    return config, init_params(config, jax.random.key(0)), tasks.default_vocabulary()


def test_pad_inputs_truncates_keeping_eos_or_rejects():
    padded, truncated = pad_inputs([[5, 6, 1], [5, 6, 7, 8, 9, 1]], 4)
    np.testing.assert_array_equal(padded, [[5, 6, 1, 0], [5, 6, 7, 1]])
    assert truncated == 1
    with pytest.raises(UserError, match="input 1 has 6 tokens"):
        pad_inputs([[5, 1], [5, 6, 7, 8, 9, 1]], 4, strict=True)


def test_decode_texts_keeps_order_and_equals_generate(tiny):
    config, params, vocab = tiny
    texts = [f"translate English to Spanish: verse {i}" for i in range(5)]
    records = decode_texts(config, params, vocab, texts, input_length=16, batch_size=2, max_decode_length=6)
    assert [r["input"] for r in records] == texts  # 3 batches, the last one padded
    inputs, _ = pad_inputs([vocab.encode(t) + [1] for t in texts], 16)
    tokens, scores = generate(config, params, inputs, max_decode_length=6)
    assert [r["output"] for r in records] == [vocab.decode(row) for row in np.asarray(tokens)]
    np.testing.assert_allclose([r["score"] for r in records], scores, rtol=1e-5)


def test_evaluate_task_scores_predictions_with_the_task_metrics(tiny):
    config, params, vocab = tiny
    task = tasks.get("bible_translate_en_es")
    results, records = evaluate_task(config, params, task, vocab, split="validation", max_examples=5, batch_size=4,
                                     input_length=192, max_decode_length=8)
    assert results["num_examples"] == 5 == len(records)
    expected = metrics.compute(["bleu", "chrf"], [r["target"] for r in records], [r["prediction"] for r in records])
    assert results["bleu"] == pytest.approx(expected["bleu"]) and results["chrf"] == pytest.approx(expected["chrf"])

    # Perplexity: exp(mean NLL per reference token), recomputed here from a plain forward pass.
    examples = task.eval_examples("validation", vocab, max_examples=5)
    total, count = 0.0, 0
    for ex in examples:
        enc = np.asarray(ex["inputs"])[None]
        tgt = np.asarray(vocab.encode(ex["targets_pretokenized"]) + [1])[None]
        dec = np.concatenate([[[0]], tgt[:, :-1]], axis=1)
        log_probs = jax.nn.log_softmax(EncoderDecoder(config).apply({"params": params}, enc, dec))
        total += float(np.take_along_axis(np.asarray(log_probs), tgt[..., None], -1).sum())
        count += tgt.size
    assert results["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-3)


def test_target_log_likelihood_ignores_padding(tiny):
    config, params, _ = tiny
    enc = np.array([[5, 6, 1, 0]])
    tgt = np.array([[7, 8, 1, 0, 0]])
    ll, counts = target_log_likelihoods(config, params, enc, tgt, batch_size=1)
    ll_short, _ = target_log_likelihoods(config, params, enc, tgt[:, :3], batch_size=1)
    assert counts[0] == 3 and ll[0] == pytest.approx(ll_short[0], rel=1e-5)
