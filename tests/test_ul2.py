"""UL2's mixture of denoisers: realised statistics on 10,000 examples, exact re-interleaving, mode
tokens, mixing rates, lengths that fit, the sentinel cap, and exact pipeline restore."""

import logging

import numpy as np
import pytest
from scipy import stats

from t5lite.data import objectives as O
from t5lite.data import pipeline, tasks
from t5lite.errors import UserError
from tests.test_preprocessors import deinterleave

VOCAB = 32100  # T5's 32000 pieces + 100 sentinels
MODE_IDS = {"R": np.array([5, 6], np.int32), "X": np.array([7], np.int32), "S": np.array([8, 9, 10], np.int32)}


def denoise_many(n, rates="uniform", lengths=(450, 600), seed=0):
    """n random chunks through ul2_denoise -> [(tokens, denoiser index, inputs, targets)]."""
    probabilities = O.mixing_rates(O.UL2_DENOISERS, rates)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tokens = rng.integers(3, VOCAB - 100, int(rng.integers(*lengths))).astype(np.int32)
        ex = O.ul2_denoise({"targets": tokens}, np.random.default_rng([seed, i]), denoisers=O.UL2_DENOISERS,
                           probabilities=probabilities, mode_ids=MODE_IDS, vocab_size=VOCAB)
        out.append((tokens, ex["denoiser"], ex["inputs"], ex["targets"]))
    return out


@pytest.fixture(scope="module")
def ten_thousand():
    return denoise_many(10_000)


def test_each_denoiser_realises_its_noise_rate_and_mean_span_on_10000_examples(ten_thousand):
    for k, d in enumerate(O.UL2_DENOISERS):
        mine = [(tokens, inputs, targets) for tokens, j, inputs, targets in ten_thousand if j == k]
        total = sum(len(t) for t, _, _ in mine)
        if d.kind == "S":
            noise = sum(len(targets) for _, _, targets in mine)
            spans = len(mine)  # one target span per example, UL2's mu = L / 4
            mean_span_setting = d.noise_density * total / len(mine)
        else:
            sentinels = [int(np.sum(targets >= VOCAB - 100)) for _, _, targets in mine]
            noise = sum(len(targets) for _, _, targets in mine) - sum(sentinels)
            spans, mean_span_setting = sum(sentinels), d.mean_noise_span_length
        assert abs(noise / total - d.noise_density) <= 0.05 * d.noise_density, (str(d), noise / total)
        assert abs(noise / spans - mean_span_setting) <= 0.05 * mean_span_setting, (str(d), noise / spans)


def test_inputs_and_targets_reinterleave_into_the_original_tokens_with_the_mode_token_first(ten_thousand):
    for tokens, k, inputs, targets in ten_thousand:
        kind = O.UL2_DENOISERS[k].kind
        mode = MODE_IDS[kind]
        np.testing.assert_array_equal(inputs[:len(mode)], mode)
        body = inputs[len(mode):]
        if kind == "S":  # a prefix and its continuation, no sentinels
            assert len(body) >= 1 and len(targets) >= 1 and not np.any(targets >= VOCAB - 100)
            np.testing.assert_array_equal(np.concatenate([body, targets]), tokens)
        else:
            np.testing.assert_array_equal(deinterleave(body, targets, VOCAB), tokens)
            assert np.sum(targets >= VOCAB - 100) <= 100


@pytest.mark.parametrize("rates", ["uniform", "ul2r"])
def test_mixing_frequencies_match_the_rates(rates, ten_thousand):
    chosen = ([k for _, k, _, _ in ten_thousand] if rates == "uniform"
              else [k for _, k, _, _ in denoise_many(10_000, rates, lengths=(20, 40), seed=1)])
    counts = np.bincount(chosen, minlength=len(O.UL2_DENOISERS))
    expected = O.mixing_rates(O.UL2_DENOISERS, rates)
    assert np.all(np.abs(counts / 10_000 - expected) <= 0.02)
    assert stats.chisquare(counts, expected * 10_000).pvalue > 1e-3


def test_mixing_rate_presets_and_errors():
    d = O.UL2_DENOISERS
    np.testing.assert_allclose(O.mixing_rates(d, "ul2r"), [.125, .125, .0625, .0625, .0625, .0625, .5])
    np.testing.assert_allclose(O.mixing_rates(d), np.full(7, 1 / 7))
    np.testing.assert_allclose(O.mixing_rates(d, {"R": 1, "X": 1, "S": 2}), [.125, .125, .0625, .0625, .0625, .0625, .5])
    np.testing.assert_allclose(O.mixing_rates(d, [1, 0, 0, 0, 0, 0, 3]), [.25, 0, 0, 0, 0, 0, .75])
    for bad in ["ul3", {"R": 1, "X": 1}, [1, 2], [1, -1, 1, 1, 1, 1, 1], [0] * 7]:
        with pytest.raises(UserError):
            O.mixing_rates(d, bad)
    assert O.as_denoiser(("X", 0.5, 64)) == O.Denoiser("X", 0.5, 64.0) and str(O.as_denoiser(["S", 0.25])) == "S(0.25)"
    for bad in [("Y", 0.1, 3), ("R", 0.0, 3), ("R", 0.15), ("S", 0.75), "R"]:
        with pytest.raises(UserError):
            O.as_denoiser(bad)


def test_more_spans_than_sentinels_are_capped_deterministically(caplog):
    """X(3, 0.5) on 1,000 tokens wants ~167 spans; there are 100 sentinels: 100 longer spans."""
    tokens = np.random.default_rng(0).integers(3, VOCAB - 100, 1000).astype(np.int32)
    x3 = [O.Denoiser("X", 0.5, 3.0)]
    outs = [O.ul2_denoise({"targets": tokens}, np.random.default_rng(7), denoisers=x3, probabilities=np.ones(1),
                          mode_ids=MODE_IDS, vocab_size=VOCAB) for _ in range(2)]
    np.testing.assert_array_equal(outs[0]["inputs"], outs[1]["inputs"])  # same rng, same output
    targets = outs[0]["targets"]
    sentinels = targets[targets >= VOCAB - 100]
    np.testing.assert_array_equal(sentinels, np.arange(VOCAB - 1, VOCAB - 101, -1))  # each sentinel once, in order
    assert len(targets) - 100 == 500
    np.testing.assert_array_equal(deinterleave(outs[0]["inputs"][1:], targets, VOCAB), tokens)
    # The lengths account for the cap, and building such a recipe says so.
    modes = {k: len(v) for k, v in MODE_IDS.items()}
    assert O.ul2_feature_lengths(1000, x3, modes) == {"inputs": 1 + 500 + 100 + 1, "targets": 500 + 100 + 1}
    with caplog.at_level(logging.WARNING):
        O.ul2_preprocessors(tasks.default_vocabulary(), {"inputs": 700, "targets": 700}, denoisers=x3, raw_length=1000)
    assert "100 sentinels" in caplog.text and "X(3, 0.5)" in caplog.text


def test_lengths_fit_the_feature_lengths_and_the_raw_length_is_the_largest_that_does():
    modes = {k: len(v) for k, v in MODE_IDS.items()}
    lengths = {"inputs": 128, "targets": 96}
    raw = O.ul2_raw_length(lengths, O.UL2_DENOISERS, modes)
    needed = O.ul2_feature_lengths(raw, O.UL2_DENOISERS, modes)
    assert needed["inputs"] <= 128 and needed["targets"] <= 96
    above = O.ul2_feature_lengths(raw + 1, O.UL2_DENOISERS, modes)
    assert above["inputs"] > 128 or above["targets"] > 96
    # Realised lengths (EOS included) never pass the bound, for every chunk length up to raw.
    probabilities = O.mixing_rates(O.UL2_DENOISERS)
    rng = np.random.default_rng(0)
    most = {"inputs": 0, "targets": 0}
    for i in range(3000):
        tokens = rng.integers(3, VOCAB - 100, int(rng.integers(1, raw + 1))).astype(np.int32)
        ex = O.ul2_denoise({"targets": tokens}, np.random.default_rng([1, i]), denoisers=O.UL2_DENOISERS,
                           probabilities=probabilities, mode_ids=MODE_IDS, vocab_size=VOCAB)
        most = {k: max(most[k], len(ex[k]) + 1) for k in most}
    assert most["inputs"] <= needed["inputs"] and most["targets"] <= needed["targets"]
    for d in O.UL2_DENOISERS:  # and each denoiser's bound is tight at the raw length
        tokens = rng.integers(3, VOCAB - 100, raw).astype(np.int32)
        realised = [O.ul2_denoise({"targets": tokens}, np.random.default_rng([2, i]), denoisers=[d],
                                  probabilities=np.ones(1), mode_ids=MODE_IDS, vocab_size=VOCAB) for i in range(400)]
        assert (max(len(ex["inputs"]) for ex in realised) + 1, max(len(ex["targets"]) for ex in realised) + 1) == \
            O._most_lengths(d, raw, modes[d.kind], 100), str(d)
    with pytest.raises(UserError, match="need feature_lengths"):
        O.ul2_preprocessors(tasks.default_vocabulary(), lengths, raw_length=raw + 50)
    with pytest.raises(UserError):
        O.ul2_preprocessors(tasks.default_vocabulary(), {"inputs": 8, "targets": 8})
    assert tasks.ul2_feature_lengths(512) == {"inputs": 512, "targets": 339}


def test_ul2_task_batches_start_every_segment_with_its_mode_token_and_nothing_is_cut():
    vocab = tasks.default_vocabulary()
    lengths = {"inputs": 96, "targets": 64}
    it = tasks.get("bible_ul2r_en_es").pipeline("validation", feature_lengths=lengths, batch_size=8,
                                                process_index=0, process_count=1)
    seen = {}
    for batch in (next(it) for _ in range(6)):
        for row in range(8):
            ids, segs = batch["encoder_input_tokens"][row], batch["encoder_segment_ids"][row]
            for s in range(1, segs.max() + 1):
                segment = ids[segs == s]
                text = vocab.decode(segment)
                mode = next((m for m in O.MODE_TOKENS.values() if text.startswith(m)), None)
                assert mode is not None, text
                seen[mode] = seen.get(mode, 0) + 1
                assert segment[-1] == vocab.eos_id  # never trimmed: EOS survives
            targets, tsegs = batch["decoder_target_tokens"][row], batch["decoder_segment_ids"][row]
            assert all(targets[tsegs == s][-1] == vocab.eos_id for s in range(1, tsegs.max() + 1))
    assert set(seen) == set(O.MODE_TOKENS.values()) and seen["[S2S]"] > seen["[NLU]"]  # UL2R: half are S
    plain = tasks.ul2_task("test_ul2_no_modes", mode_tokens=False, rates="ul2r")
    batch = next(plain.pipeline("validation", feature_lengths=lengths, batch_size=4, process_index=0, process_count=1))
    assert not any(m in vocab.decode(r) for r in batch["encoder_input_tokens"] for m in O.MODE_TOKENS.values())


def test_ul2_pipeline_restores_exactly():
    kwargs = dict(feature_lengths={"inputs": 64, "targets": 64}, batch_size=4, seed=5,
                  process_index=0, process_count=1)
    task = tasks.get("bible_ul2_en_es")
    it = task.pipeline("validation", **kwargs)
    for _ in range(3):
        next(it)
    state = pipeline.iterator_state(it)
    expected = [next(it) for _ in range(4)]
    restored = task.pipeline("validation", **kwargs)
    pipeline.restore_iterator(restored, state)
    for a, b in zip(expected, (next(restored) for _ in range(4))):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
