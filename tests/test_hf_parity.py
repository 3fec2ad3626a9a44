"""Logit parity with HF transformers' T5 (PyTorch) in both directions, on random weights."""

import numpy as np
import pytest

from tests.hf_reference import hf_logits, load_hf, make_hf_checkpoint, random_batch
from t5lite.convert.hf import from_hf, to_hf
from t5lite.model import EncoderDecoder, init_params
from t5lite.model.positions import relative_position_bucket

import jax

SMALL = dict(vocab_size=160, d_model=32, d_kv=8, num_heads=4, d_ff=64)
CASES = {
    "v1_0_relu_tied": dict(SMALL, feed_forward_proj="relu", num_layers=2),
    "v1_1_gated_gelu_untied": dict(SMALL, feed_forward_proj="gated-gelu", num_layers=2, untied=True),
    "buckets_16_distance_20": dict(SMALL, feed_forward_proj="gated-gelu", num_layers=2,
                                   relative_attention_num_buckets=16, relative_attention_max_distance=20),
    "depths_3_enc_1_dec": dict(SMALL, feed_forward_proj="relu", num_layers=3, num_decoder_layers=1),
    "gated_silu_untied": dict(SMALL, feed_forward_proj="gated-silu", num_layers=1, untied=True),
}


def _t5lite_logits(cfg, params, enc, dec_in, targets):
    return np.asarray(EncoderDecoder(cfg).apply({"params": params}, enc, dec_in, decoder_target_tokens=targets))


def _assert_parity(ours, ref, targets):
    valid = targets > 0  # padded decoder positions are masked differently on purpose; compare real ones
    err = np.abs(ours[valid] - ref[valid]).max()
    assert err <= 1e-4 * np.abs(ref[valid]).max(), f"max |t5lite - HF| = {err}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_hf_logits_match(case, tmp_path):
    spec = dict(CASES[case])
    untied = spec.pop("untied", False)
    hf = make_hf_checkpoint(tmp_path / "hf", untied=untied, **spec)
    cfg, params = from_hf(str(tmp_path / "hf"))
    assert cfg.logits_via_embedding == (not untied)
    assert cfg.num_decoder_layers == spec.get("num_decoder_layers", spec["num_layers"])

    rng = np.random.default_rng(0)
    # Lengths past max_distance exercise the log-spaced and clipped buckets; padding on both sides.
    enc, dec_in, targets = random_batch(rng, cfg.vocab_size, [45, 17, 3], [30, 9, 1], 45, 30)
    _assert_parity(_t5lite_logits(cfg, params, enc, dec_in, targets), hf_logits(hf, enc, dec_in), targets)


@pytest.mark.parametrize("case", ["v1_0_relu_tied", "v1_1_gated_gelu_untied", "depths_3_enc_1_dec"])
def test_round_trip_through_hf(case, tmp_path):
    """t5lite params -> to_hf -> HF logits equal t5lite's -> from_hf gives back the same params."""
    spec = dict(CASES[case])
    untied = spec.pop("untied", False)
    make_hf_checkpoint(tmp_path / "seed", untied=untied, **spec)
    cfg, _ = from_hf(str(tmp_path / "seed"))
    params = init_params(cfg, jax.random.key(3))  # t5lite's own random weights, not HF's
    to_hf(cfg, params, str(tmp_path / "out"))

    rng = np.random.default_rng(1)
    enc, dec_in, targets = random_batch(rng, cfg.vocab_size, [20, 7], [12, 5], 20, 12)
    ours = _t5lite_logits(cfg, params, enc, dec_in, targets)
    _assert_parity(ours, hf_logits(load_hf(str(tmp_path / "out")), enc, dec_in), targets)

    cfg2, params2 = from_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(_t5lite_logits(cfg2, params2, enc, dec_in, targets), ours)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (64, 256), (8, 16)])
def test_relative_position_buckets_match_hf(bidirectional, num_buckets, max_distance):
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    rp = np.arange(-1500, 1500)
    ref = T5Attention._relative_position_bucket(torch.tensor(rp), bidirectional, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(rp, bidirectional, num_buckets, max_distance), ref)
