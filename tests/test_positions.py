"""Position schemes against their papers' formulas: sinusoids, RoPE, ALiBi; and what the model feeds them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.model import EncoderDecoder, get_config, init_params
from t5lite.model.positions import ALiBi, RoPE, alibi_slopes, apply_rotary, sinusoidal_table


def test_sinusoidal_table_is_vaswanis_formula():
    positions, dim = np.array([0, 1, 5, 37]), 10
    table = np.asarray(sinusoidal_table(jnp.asarray(positions), dim))
    for row, pos in enumerate(positions):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[row, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[row, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def _rope(positions, head_dim=8, fraction=1.0, theta=10_000.0):
    cfg = get_config("tiny", position_scheme="rope", head_dim=head_dim, rope_fraction=fraction, rope_theta=theta)
    x = jnp.zeros((1, len(positions), cfg.emb_dim))
    _, bias, rotary = RoPE(cfg, True).apply({}, x, jnp.asarray([positions]), len(positions))
    assert bias is None
    return rotary


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_is_complex_multiplication_of_pairs(fraction):
    head_dim, theta = 8, 500.0
    positions = [0, 3, 11]
    rotary = _rope(positions, head_dim, fraction, theta)
    x = np.random.default_rng(0).normal(size=(1, 3, 2, head_dim)).astype(np.float32)  # [B, L, H, Dh]
    got = np.asarray(apply_rotary(jnp.asarray(x), rotary))
    r = int(head_dim * fraction) // 2 * 2
    half = r // 2
    freqs = theta ** (-np.arange(half) / half)
    for t, pos in enumerate(positions):
        z = (x[0, t, :, :half] + 1j * x[0, t, :, half:r]) * np.exp(1j * pos * freqs)  # [H, R/2]
        np.testing.assert_allclose(got[0, t, :, :half], z.real, atol=1e-5)
        np.testing.assert_allclose(got[0, t, :, half:r], z.imag, atol=1e-5)
        np.testing.assert_array_equal(got[0, t, :, r:], x[0, t, :, r:])  # the unrotated share passes


def test_rope_dot_products_depend_only_on_the_offset():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32)) for _ in range(2))

    def dot(pq, pk):
        rq, rk = _rope([pq], 16), _rope([pk], 16)
        return float(jnp.sum(apply_rotary(q, rq) * apply_rotary(k, rk)))

    base = dot(7, 3)
    assert dot(104, 100) == pytest.approx(base, rel=1e-4)
    assert dot(4, 0) == pytest.approx(base, rel=1e-4)
    assert abs(dot(9, 3) - base) > 1e-3  # another offset, another score


def test_alibi_slopes_are_the_papers_geometric_sequence():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])  # 1/2 ... 1/256
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** -(2 * i) for i in range(1, 5)])
    # Not a power of two: the 4-head slopes, then every other slope of the 8-head sequence.
    np.testing.assert_allclose(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])


@pytest.mark.parametrize("query_offset", [None, 3])
def test_alibi_bias_is_slope_times_distance(query_offset):
    cfg = get_config("tiny", position_scheme="alibi", num_heads=8)
    q_len, k_len = (4, 4) if query_offset is None else (1, 6)
    _, bias, rotary = ALiBi(cfg, False).apply({}, jnp.zeros((1, q_len, cfg.emb_dim)), None, k_len, query_offset)
    assert rotary is None and bias.shape == (1, 8, q_len, k_len)
    start = query_offset or 0
    for h, slope in enumerate(2.0 ** -np.arange(1, 9)):
        for i in range(q_len):
            for j in range(k_len):
                assert bias[0, h, i, j] == pytest.approx(-slope * abs(start + i - j))


@pytest.mark.parametrize("scheme, moves", [("absolute_learned", True), ("sinusoidal", True), ("rope", False),
                                           ("alibi", False), ("t5_relative_bias", False)])
def test_absolute_schemes_use_the_given_positions(scheme, moves):
    """Shifting a sequence's positions changes absolute-scheme outputs but not relative ones;
    no positions means 0..L-1."""
    enc, dec = np.array([[5, 6, 7, 8, 1]]), np.array([[0, 9, 10]])
    cfg = get_config("tiny", position_scheme=scheme)
    params = init_params(cfg, jax.random.key(0))
    model = EncoderDecoder(cfg)
    run = jax.jit(lambda shift, **positions: model.apply(
        {"params": params}, enc, dec, **{k: v + shift for k, v in positions.items()}))
    default = np.asarray(run(0))
    np.testing.assert_allclose(run(0, encoder_positions=np.arange(5)[None], decoder_positions=np.arange(3)[None]),
                               default, atol=1e-6)
    shifted = np.asarray(run(7, encoder_positions=np.arange(5)[None], decoder_positions=np.arange(3)[None]))
    assert (np.abs(shifted - default).max() > 1e-3) == moves
    if not moves:
        np.testing.assert_allclose(shifted, default, atol=2e-5)


def test_absolute_learned_refuses_sequences_longer_than_its_table():
    cfg = get_config("tiny", position_scheme="absolute_learned", max_position_embeddings=8)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(UserError, match="max_position_embeddings"):
        EncoderDecoder(cfg).apply({"params": params}, np.ones((1, 9), np.int32), np.ones((1, 2), np.int32))
