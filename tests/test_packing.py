"""Feature conversion and packing: seqio's documented examples, and a loop reference on random data."""

import collections

import numpy as np
import pytest

from t5lite.data import packing
from t5lite.data.pipeline import make_pipeline
from t5lite.errors import UserError


def rows(examples, feature_lengths, *, pack=True, decoder_only=False, pack_window=1):
    """Every row the pipeline makes from `examples`, in source order (one row per batch)."""
    it = make_pipeline(examples, [], feature_lengths=feature_lengths, batch_size=1, seed=0,
                       shuffle=False, num_epochs=1, pack=pack, decoder_only=decoder_only,
                       process_index=0, process_count=1, pack_window=pack_window)
    return [{k: v[0] for k, v in batch.items()} for batch in it]


def ex(inputs, targets):
    return {"inputs": np.array(inputs, np.int32), "targets": np.array(targets, np.int32)}


# --- seqio's documented conversions (feature_converters.py docstrings) -------------------------


def test_encdec_packed_matches_seqio_example():
    out = rows([ex([7, 8, 5, 1], [3, 9, 1]), ex([8, 4, 9, 3, 1], [4, 1])],
               {"inputs": 10, "targets": 7})
    assert len(out) == 1
    expected = {
        "encoder_input_tokens": [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
        "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
        "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
        "decoder_target_tokens": [3, 9, 1, 4, 1, 0, 0],
        "decoder_input_tokens": [0, 3, 9, 0, 4, 0, 0],
        "decoder_loss_weights": [1, 1, 1, 1, 1, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 2, 2, 0, 0],
        "decoder_positions": [0, 1, 2, 0, 1, 0, 0],
    }
    assert set(out[0]) == set(expected)
    for key, value in expected.items():
        assert out[0][key].dtype == np.int32
        np.testing.assert_array_equal(out[0][key], value, err_msg=key)


def test_encdec_unpacked_has_no_segments_and_pads_with_zero():
    out = rows([ex([7, 8, 5, 1], [3, 9, 1]), ex([8, 4, 9, 3, 1], [4, 1])],
               {"inputs": 10, "targets": 7}, pack=False)
    assert len(out) == 2
    assert set(out[0]) == {"encoder_input_tokens", "decoder_target_tokens",
                           "decoder_input_tokens", "decoder_loss_weights"}
    np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [7, 8, 5, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[0]["decoder_target_tokens"], [3, 9, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[0]["decoder_input_tokens"], [0, 3, 9, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[0]["decoder_loss_weights"], [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1]["decoder_input_tokens"], [0, 4, 0, 0, 0, 0, 0])


def test_prefix_lm_packed_matches_seqio_example():
    out = rows([ex([9, 4, 6, 1], [3, 9, 1]), ex([3, 2, 1], [4, 1])],
               {"inputs": 7, "targets": 8}, decoder_only=True)
    assert len(out) == 1
    expected = {
        "decoder_target_tokens": [9, 4, 6, 1, 3, 9, 1, 3, 2, 1, 4, 1, 0, 0, 0],
        "decoder_input_tokens": [0, 9, 4, 6, 1, 3, 9, 0, 3, 2, 1, 4, 0, 0, 0],
        "decoder_loss_weights": [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        "decoder_positions": [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
    }
    assert set(out[0]) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(out[0][key], value, err_msg=key)


def test_prefix_lm_unpacked_matches_seqio_example():
    out = rows([ex([9, 4, 6, 1], [3, 9, 1])], {"inputs": 5, "targets": 4}, pack=False,
               decoder_only=True)
    expected = {
        "decoder_target_tokens": [9, 4, 6, 1, 3, 9, 1, 0, 0],
        "decoder_input_tokens": [0, 9, 4, 6, 1, 3, 9, 0, 0],
        "decoder_loss_weights": [0, 0, 0, 0, 1, 1, 1, 0, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 1, 0, 0, 0, 0],
    }
    assert set(out[0]) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(out[0][key], value, err_msg=key)


def test_plain_lm_has_no_prefix_and_rejects_unexpected_inputs():
    out = rows([{"targets": np.array([5, 6, 1])}, {"targets": np.array([7, 1])}], {"targets": 6},
               decoder_only=True)
    assert set(out[0]) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                           "decoder_segment_ids", "decoder_positions"}
    np.testing.assert_array_equal(out[0]["decoder_target_tokens"], [5, 6, 1, 7, 1, 0])
    np.testing.assert_array_equal(out[0]["decoder_input_tokens"], [0, 5, 6, 0, 7, 0])
    np.testing.assert_array_equal(out[0]["decoder_loss_weights"], [1, 1, 1, 1, 1, 0])
    with pytest.raises(UserError, match="'inputs' length"):
        rows([ex([1], [2])], {"targets": 6}, decoder_only=True)


# --- Random data against a loop reference ------------------------------------------------------


def random_examples(n, seed, max_inputs=14, max_targets=9):
    """Examples with tokens >= 2 (never pad) and some longer than the feature lengths below."""
    rng = np.random.default_rng(seed)
    return [ex(rng.integers(2, 1000, rng.integers(0, max_inputs)),
               rng.integers(2, 1000, rng.integers(1, max_targets))) for _ in range(n)]


def segments_of(row, prefix, token_key):
    """{segment id: tokens} of one row, checking positions count 0.. and padding is all zero."""
    seg, pos, tok = row[f"{prefix}_segment_ids"], row[f"{prefix}_positions"], row[token_key]
    pad = seg == 0
    assert not tok[pad].any() and not pos[pad].any()
    ids = sorted(set(seg[~pad].tolist()))
    out = {}
    for s in ids:
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all(), "a segment must be contiguous"
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        out[s] = tok[where]
    return out


def ref_shift_within_segments(tokens, segment_ids):
    """decoder_input_tokens by a loop: previous token if it is in the same segment, else 0."""
    out = []
    for i in range(len(tokens)):
        same = i > 0 and segment_ids[i] != 0 and segment_ids[i - 1] == segment_ids[i]
        out.append(int(tokens[i - 1]) if same else 0)
    return out


@pytest.mark.parametrize("pack_window", [1, 3, 8])
def test_packing_loses_and_duplicates_nothing(pack_window):
    lengths = {"inputs": 12, "targets": 7}
    examples = random_examples(120, seed=pack_window)
    out = rows(examples, lengths, pack_window=pack_window)
    packed = []
    for row in out:
        enc = segments_of(row, "encoder", "encoder_input_tokens")
        dec = segments_of(row, "decoder", "decoder_target_tokens")
        # Every example has targets, so decoder segments are exactly 1..k; the encoder's are a subset
        # (an example with no inputs has no encoder tokens).
        assert list(dec) == list(range(1, len(dec) + 1))
        assert set(enc) <= set(dec)
        for s in dec:
            packed.append((tuple(enc.get(s, ())), tuple(dec[s])))
        np.testing.assert_array_equal(
            row["decoder_input_tokens"],
            ref_shift_within_segments(row["decoder_target_tokens"], row["decoder_segment_ids"]))
        np.testing.assert_array_equal(row["decoder_loss_weights"], row["decoder_segment_ids"] > 0)
    trimmed = [(tuple(e["inputs"][:12]), tuple(e["targets"][:7])) for e in examples]
    assert collections.Counter(packed) == collections.Counter(trimmed)
    if pack_window > 1:  # a wider window packs tighter
        assert len(out) < len(rows(examples, lengths, pack_window=1))


def test_prefix_lm_packing_loses_nothing_and_weights_only_targets():
    examples = random_examples(80, seed=7, max_inputs=6, max_targets=6)
    out = rows(examples, {"inputs": 5, "targets": 4}, decoder_only=True, pack_window=4)
    seen = []
    for row in out:
        seg = row["decoder_segment_ids"]
        dec = segments_of(row, "decoder", "decoder_target_tokens")
        for s, tokens in dec.items():
            where = seg == s
            weights, causal = row["decoder_loss_weights"][where], row["decoder_causal_attention"][where]
            n_in = int(len(tokens) - weights.sum())
            assert (weights == np.r_[np.zeros(n_in), np.ones(len(tokens) - n_in)]).all()
            # Bidirectional over the prefix plus one (the first target's input is the last prefix token).
            n_bi = n_in + 1 if n_in else 0
            assert (causal == (np.arange(len(tokens)) < n_bi)).all()
            seen.append((tuple(tokens[:n_in]), tuple(tokens[n_in:])))
        assert not row["decoder_causal_attention"][seg == 0].any()
        np.testing.assert_array_equal(row["decoder_input_tokens"],
                                      ref_shift_within_segments(row["decoder_target_tokens"], seg))
    trimmed = [(tuple(e["inputs"][:5]), tuple(e["targets"][:4])) for e in examples]
    assert collections.Counter(seen) == collections.Counter(trimmed)


def test_examples_without_targets_are_dropped_and_bad_fields_are_user_errors():
    out = rows([ex([5], []), ex([6], [7])], {"inputs": 4, "targets": 4}, pack=False)
    assert len(out) == 1 and out[0]["encoder_input_tokens"][0] == 6
    with pytest.raises(UserError, match="no field 'inputs'"):
        rows([{"targets": np.array([3])}], {"inputs": 4, "targets": 4})
    with pytest.raises(UserError, match="not token ids"):
        rows([{"inputs": "text", "targets": "text"}], {"inputs": 4, "targets": 4})
    with pytest.raises(UserError, match="no 'inputs' length"):
        packing.row_lengths({"targets": 4}, decoder_only=False)
    with pytest.raises(UserError, match="positive integers"):
        packing.row_lengths({"inputs": 4, "targets": 0}, decoder_only=False)
