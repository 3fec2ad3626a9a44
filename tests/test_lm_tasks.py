"""Causal LM and prefix LM tasks for DecoderOnly: the rows hold the whole token stream, the loss
weights cover exactly the targets, and packed rows give the same loss as the examples unpadded."""

import functools

import grain
import jax
import numpy as np
import pytest

from t5lite.data import objectives, packing, tasks
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, get_config, init_params
from t5lite.train.step import eval_step


@pytest.fixture(scope="module")
def vocab():
    return tasks.default_vocabulary()


def document_stream(vocab, split="validation"):
    """Every validation document (English then Spanish verse) tokenized + EOS, concatenated: [N]."""
    docs = tasks.get("bible_clm_en_es").source(split)
    return np.concatenate([vocab.encode(docs[i]["text"]) + [vocab.eos_id] for i in range(len(docs))])


def epoch_rows(name, feature_lengths):
    """One unshuffled, unpacked epoch of the decoder-only task: a list of batches of 1 row."""
    it = tasks.get(name).pipeline("validation", feature_lengths=feature_lengths, batch_size=1, shuffle=False,
                                  num_epochs=1, pack=False, decoder_only=True, process_index=0, process_count=1)
    return list(it)


def test_causal_lm_rows_cover_the_stream_and_weight_every_token(vocab):
    rows = epoch_rows("bible_clm_en_es", {"targets": 64})
    tokens = [r["decoder_target_tokens"][0][r["decoder_target_tokens"][0] > 0] for r in rows]
    np.testing.assert_array_equal(np.concatenate(tokens), document_stream(vocab))
    assert all(len(t) == 64 for t in tokens[:-1])
    for r in rows:
        np.testing.assert_array_equal(r["decoder_loss_weights"], r["decoder_target_tokens"] > 0)
        assert "decoder_causal_attention" not in r
    with pytest.raises(UserError, match="no inputs"):
        tasks.get("bible_clm_en_es").preprocessors(vocab, {"inputs": 8, "targets": 64})


def test_prefix_lm_weights_only_the_targets_and_the_prefix_is_bidirectional(vocab):
    rows = epoch_rows("bible_prefix_lm_en_es", {"inputs": 48, "targets": 48})
    pieces, prefixes = [], []
    for r in rows:
        tokens, weights = r["decoder_target_tokens"][0], r["decoder_loss_weights"][0]
        prefix = int(r["decoder_causal_attention"][0].sum()) - 1  # the prefix + the first target's input
        n = int((tokens > 0).sum())
        assert 1 <= prefix < n <= 48
        np.testing.assert_array_equal(r["decoder_causal_attention"][0], np.arange(96) <= prefix)
        np.testing.assert_array_equal(weights, (np.arange(96) >= prefix) & (np.arange(96) < n))
        pieces.append(tokens[:n])
        prefixes.append(prefix / n)
    np.testing.assert_array_equal(np.concatenate(pieces), document_stream(vocab))  # prefix + targets = the chunk
    assert 0.4 < np.mean(prefixes) < 0.6  # a random pivot, uniform: half the chunk on average
    with pytest.raises(UserError, match="'inputs' and 'targets'"):
        tasks.get("bible_prefix_lm_en_es").preprocessors(vocab, {"targets": 64})


def examples_of(name, vocab, feature_lengths, n, seed=0):
    """The first n examples the task's preprocessors make from the validation documents (no pipeline)."""
    steps = tasks.get(name).preprocessors(vocab, feature_lengths)
    docs = tasks.get(name).source("validation")
    stream = np.concatenate([steps[0](docs[i], None)["targets"] for i in range(40)])
    chunk = steps[1].length
    out = []
    for i in range(n):
        example = {"targets": stream[i * chunk:(i + 1) * chunk]}
        for fn in steps[2:]:
            example = fn(example, np.random.default_rng([seed, i]))
        out.append(example)
    return out


def rows_of(examples, feature_lengths, pack):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packing.pack_or_pad(ds, feature_lengths, decoder_only=True, pack=pack, pack_window=4))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("name,feature_lengths", [("bible_prefix_lm_en_es", {"inputs": 24, "targets": 24}),
                                                  ("bible_clm_en_es", {"targets": 24})])
def test_packed_rows_give_the_same_loss_as_the_examples_unpacked(name, feature_lengths, vocab):
    examples = examples_of(name, vocab, feature_lengths, 12)
    if name == "bible_clm_en_es":  # full chunks would fill rows alone: cut them to varied lengths
        examples = [{"targets": ex["targets"][:5 + 3 * (i % 5)]} for i, ex in enumerate(examples)]
    packed, padded = rows_of(examples, feature_lengths, True), rows_of(examples, feature_lengths, False)
    assert len(packed["decoder_target_tokens"]) < len(padded["decoder_target_tokens"]) == 12
    config = get_config("tiny", vocab_size=vocab.vocab_size, decoder_only_prefix_lm="inputs" in feature_lengths)
    model = DecoderOnly(config)
    params = init_params(config, jax.random.key(0), decoder_only=True)
    sums = jax.jit(functools.partial(eval_step, model=model))
    a = {k: float(v) for k, v in sums(params, packed).items()}
    b = {k: float(v) for k, v in sums(params, padded).items()}
    expected_weight = sum(len(ex["targets"]) for ex in examples)
    assert a["weight_sum"] == b["weight_sum"] == expected_weight
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=2e-5)
    assert a["correct"] == b["correct"]


def test_objective_recipes_reject_lengths_they_cannot_fill(vocab):
    with pytest.raises(UserError):
        objectives.prefix_lm_preprocessors(vocab, {"inputs": 1, "targets": 8})
    with pytest.raises(UserError, match="text field"):
        objectives.causal_lm_preprocessors(vocab, {"targets": 8}, text_key="body")[0]({"text": "x"}, None)
