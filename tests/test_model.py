"""Model structure and behaviour: golden shapes, HF parameter counts, packing, scan, remat, dropout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.model import (PRESETS, DecoderOnly, EncoderDecoder, T5Config, abstract_params, count_params, get_config,
                          init_params, logical_axes, param_shapes, scan_params, unscan_params)
from tests.golden.regenerate import golden_shapes

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

# model.num_parameters() of the public HF checkpoints (t5-small, ..., google/t5-v1_1-xxl).
HF_PARAM_COUNTS = {
    "t5_1_0_small": 60_506_624, "t5_1_0_base": 222_903_552, "t5_1_0_large": 737_668_096,
    "t5_1_1_small": 76_961_152, "t5_1_1_base": 247_577_856, "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184, "t5_1_1_xxl": 11_135_332_352,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_golden_parameter_shapes(name):
    with open(os.path.join(GOLDEN, f"{name}.json")) as f:
        expected = json.load(f)
    assert golden_shapes(name) == expected, "checkpoint layout changed; see tests/golden/regenerate.py"


def test_golden_scanned_layout():
    with open(os.path.join(GOLDEN, "tiny_scanned.json")) as f:
        assert golden_shapes("tiny", scan_layers=True) == json.load(f)


def test_golden_split_attention_layout():
    """The layout of every checkpoint saved before attention kernels were joined: it must keep loading."""
    with open(os.path.join(GOLDEN, "tiny_split.json")) as f:
        assert golden_shapes("tiny", attention_layout="split") == json.load(f)


@pytest.mark.parametrize("name,count", sorted(HF_PARAM_COUNTS.items()))
def test_parameter_counts_equal_hf(name, count):
    assert count_params(abstract_params(get_config(name))) == count


def test_every_parameter_has_logical_axes():
    axes = logical_axes(get_config("tiny", scan_layers=True))
    shapes = param_shapes(abstract_params(get_config("tiny", scan_layers=True)))
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    assert len(flat) == len(shapes)
    for path, spec in flat:
        name = "/".join(k.key for k in path)
        assert len(spec) == len(shapes[name]) and all(a is not None for a in spec), (name, spec)
        assert spec[0] == "layers" if "/layers/" in name else "layers" not in spec
    assert axes["token_embedder"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_config_is_hashable_and_validates():
    cfg = get_config("tiny")
    assert hash(cfg) == hash(get_config("tiny")) and cfg == T5Config.from_dict(cfg.to_dict())
    with pytest.raises(UserError, match="choose from"):
        get_config("t5_huge")
    with pytest.raises(UserError, match="valid fields"):
        get_config("tiny", emb_dimm=3)
    with pytest.raises(UserError, match="remat_policy"):
        get_config("tiny", remat_policy="sometimes")


def _apply(cfg, params, **batch):
    return np.asarray(EncoderDecoder(cfg).apply({"params": params}, **batch))


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return cfg, init_params(cfg, jax.random.key(0))


def test_packed_row_equals_examples_run_alone(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    a_in, a_tg = rng.integers(2, 500, 7), rng.integers(2, 500, 5)
    b_in, b_tg = rng.integers(2, 500, 9), rng.integers(2, 500, 6)

    def alone(inputs, targets):
        dec_in = np.concatenate([[0], targets[:-1]])
        return _apply(cfg, params, encoder_input_tokens=inputs[None], decoder_input_tokens=dec_in[None],
                      decoder_target_tokens=targets[None])[0]

    pad = lambda x, n: np.pad(x, (0, n - len(x)))  # noqa: E731
    packed = _apply(
        cfg, params,
        encoder_input_tokens=pad(np.concatenate([a_in, b_in]), 20)[None],
        encoder_segment_ids=pad(np.repeat([1, 2], [7, 9]), 20)[None],
        decoder_input_tokens=pad(np.concatenate([[0], a_tg[:-1], [0], b_tg[:-1]]), 14)[None],
        decoder_target_tokens=pad(np.concatenate([a_tg, b_tg]), 14)[None],
        decoder_segment_ids=pad(np.repeat([1, 2], [5, 6]), 14)[None],
        encoder_positions=pad(np.concatenate([np.arange(7), np.arange(9)]), 20)[None],
        decoder_positions=pad(np.concatenate([np.arange(5), np.arange(6)]), 14)[None])[0]
    np.testing.assert_allclose(packed[:5], alone(a_in, a_tg), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[5:11], alone(b_in, b_tg), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_logits(tiny):
    cfg, params = tiny
    enc, tgt = np.array([[5, 6, 7, 8, 1]]), np.array([[9, 10, 1]])
    dec = np.array([[0, 9, 10]])
    base = _apply(cfg, params, encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt)
    padded = _apply(cfg, params, encoder_input_tokens=np.pad(enc, ((0, 0), (0, 6))),
                    decoder_input_tokens=np.pad(dec, ((0, 0), (0, 4))), decoder_target_tokens=np.pad(tgt, ((0, 0), (0, 4))))
    np.testing.assert_allclose(padded[:, :3], base, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(tiny):
    cfg, params = tiny
    enc = np.array([[5, 6, 7, 1]])
    a = _apply(cfg, params, encoder_input_tokens=enc, decoder_input_tokens=np.array([[0, 9, 10, 11]]))
    b = _apply(cfg, params, encoder_input_tokens=enc, decoder_input_tokens=np.array([[0, 9, 42, 43]]))
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-6)
    assert np.abs(a[:, 2:] - b[:, 2:]).max() > 1e-3


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unscanned_layouts_agree(tiny, remat):
    cfg, params = tiny
    scanned_cfg = cfg.replace(scan_layers=True, remat_policy=remat)
    scanned = scan_params(params)
    assert param_shapes(scanned) == golden_shapes("tiny", scan_layers=True)
    batch = dict(encoder_input_tokens=np.array([[5, 6, 7, 8, 1, 0]]), decoder_input_tokens=np.array([[0, 9, 10, 1]]))
    np.testing.assert_allclose(_apply(scanned_cfg, scanned, **batch), _apply(cfg, params, **batch), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(unscan_params(scanned)), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["minimal", "save_dots", "full"])
def test_remat_gives_the_same_gradients(tiny, policy):
    cfg, params = tiny
    batch = dict(encoder_input_tokens=jnp.array([[5, 6, 7, 8, 1]]), decoder_input_tokens=jnp.array([[0, 9, 10]]))
    loss = lambda c: jax.grad(lambda p: EncoderDecoder(c).apply({"params": p}, **batch).std())(params)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(loss(cfg.replace(remat_policy=policy))), jax.tree_util.tree_leaves(loss(cfg))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_is_seeded_and_off_by_default(tiny):
    cfg, params = tiny
    model = EncoderDecoder(cfg.replace(dropout_rate=0.3))
    batch = dict(encoder_input_tokens=jnp.array([[5, 6, 7, 8, 1]]), decoder_input_tokens=jnp.array([[0, 9, 10]]))
    run = lambda seed: model.apply({"params": params}, **batch, enable_dropout=True, rngs={"dropout": jax.random.key(seed)})  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-3
    np.testing.assert_allclose(model.apply({"params": params}, **batch), EncoderDecoder(cfg).apply({"params": params}, **batch), rtol=1e-6)


def test_bfloat16_compute_stays_close_and_returns_float32(tiny):
    cfg, params = tiny
    batch = dict(encoder_input_tokens=np.array([[5, 6, 7, 8, 1]]), decoder_input_tokens=np.array([[0, 9, 10]]))
    low = _apply(cfg.replace(dtype="bfloat16"), params, **batch)
    assert low.dtype == np.float32
    assert np.abs(low - _apply(cfg, params, **batch)).max() < 0.1 * np.abs(low).max()


def test_encode_decode_equal_call(tiny):
    cfg, params = tiny
    model, enc, dec = EncoderDecoder(cfg), jnp.array([[5, 6, 7, 1]]), jnp.array([[0, 9, 10]])
    encoded = model.apply({"params": params}, enc, method=model.encode)
    assert encoded.shape == (1, 4, cfg.emb_dim)
    logits = model.apply({"params": params}, encoded, enc, dec, method=model.decode)
    np.testing.assert_allclose(logits, model.apply({"params": params}, enc, dec), rtol=1e-6)


def test_decoder_only_causal_and_prefix_lm():
    cfg = get_config("tiny", decoder_only_prefix_lm=True)
    params = init_params(cfg, jax.random.key(1), decoder_only=True)
    assert "encoder" not in params and "encoder_decoder_attention" not in params["decoder"]["layers_0"]
    model = DecoderOnly(cfg)
    x, y = jnp.array([[0, 5, 6, 7, 8]]), jnp.array([[0, 5, 9, 7, 8]])  # differ at position 2
    prefix = jnp.array([[1, 1, 1, 0, 0]])
    causal = lambda t: model.apply({"params": params}, t)  # noqa: E731
    with_prefix = lambda t: model.apply({"params": params}, t, decoder_causal_attention=prefix)  # noqa: E731
    np.testing.assert_allclose(causal(x)[:, :2], causal(y)[:, :2], rtol=1e-6)  # the past cannot see position 2
    assert np.abs(with_prefix(x)[:, :2] - with_prefix(y)[:, :2]).max() > 1e-4  # the prefix sees all of itself
