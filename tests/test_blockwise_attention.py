"""The blockwise attention core equals the dense one: the core alone (forward <= 1e-5 relative, gradients
incl. T5's bias table <= 1e-4) under every mask and position bias, whole tiny models (logits, one train step),
and its compiled train step's memory grows linearly, not quadratically, with the input length."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, get_config, init_params
from t5lite.model.attention_core import AttentionSpec, attention_core, resolve_impl
from t5lite.train import step as step_lib
from t5lite.train.state import TrainState

B, LQ, LK, H, DH = 2, 37, 45, 4, 8  # odd lengths: neither is a multiple of the blocks (8 x 16)


def _operands(kv_heads, lq=LQ, lk=LK, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, lq, H, DH), jnp.float32)
    k, v = (jnp.asarray(r.randn(B, lk, kv_heads, DH), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(r.randn(H, 32), jnp.float32)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))


def _compare(spec, q, k, v, table):
    """Forward and gradients (q, k, v, bias table) of a nonlinear loss of the output: blockwise vs dense."""
    def loss(q, k, v, table, impl):
        out = attention_core(q, k, v, spec.replace(impl=impl, table=table))
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, dense), dense_grads = grad(q, k, v, table, "dense")
    (_, block), block_grads = jax.jit(grad, static_argnums=4)(q, k, v, table, "blockwise")
    assert _rel(dense, block) <= 1e-5
    for name, a, b in zip("qkv", dense_grads, block_grads):
        assert _rel(a, b) <= 1e-4, name
    if spec.position == "t5":
        assert _rel(dense_grads[3], block_grads[3]) <= 1e-4 and float(jnp.max(jnp.abs(block_grads[3]))) > 0


def _valid(lengths, total):
    return jnp.arange(total)[None] < jnp.asarray(lengths)[:, None]  # [B, total]


@pytest.mark.parametrize("position", ["t5", "alibi", "none"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_self_attention_with_padding_equals_dense(position, kv_heads):
    q, k, v, table = _operands(kv_heads, LQ, LQ)
    valid = _valid([30, LQ], LQ)  # a padded row: its padding queries are fully masked (uniform, as dense)
    spec = AttentionSpec(q_valid=valid, k_valid=valid, position=position, num_heads=H, block_q=8, block_k=16)
    _compare(spec, q, k, v, table)


@pytest.mark.parametrize("position", ["t5", "alibi", "none"])
def test_causal_packed_and_soft_capped_equals_dense(position):
    q, k, v, table = _operands(2, LQ, LQ)
    segments = jnp.asarray(np.repeat([[1, 2, 3]], [12, 20, 5], axis=1).repeat(B, 0))  # [B, LQ], 3 packed examples
    spec = AttentionSpec(q_segments=segments, k_segments=segments, causal=True, bidirectional=False,
                         position=position, num_heads=H, softcap=5.0, block_q=8, block_k=16)
    _compare(spec, q, k, v, table)


def test_prefix_lm_and_window_equal_dense():
    q, k, v, table = _operands(4, LQ, LQ)
    prefix = _valid([10, 17], LQ)
    valid = _valid([LQ, 33], LQ)
    for window in (None, 9):
        spec = AttentionSpec(q_valid=valid, k_valid=valid, q_prefix=prefix, k_prefix=prefix, causal=True,
                             window=window, bidirectional=False, position="t5", num_heads=H, block_q=8, block_k=16)
        _compare(spec, q, k, v, table)


def test_cross_attention_equals_dense():
    q, k, v, table = _operands(2)
    spec = AttentionSpec(q_valid=_valid([LQ, 20], LQ), k_valid=_valid([LK, 31], LK), num_heads=H,
                         block_q=8, block_k=16)
    _compare(spec, q, k, v, table)


def test_auto_picks_by_backend_length_and_dropout():
    assert resolve_impl("auto", 512, 2048, dropout=False, has_bias=True, backend="cpu") == "dense"
    assert resolve_impl("auto", 4096, 2048, dropout=False, has_bias=True, backend="cpu") == "blockwise"
    assert resolve_impl("auto", 4096, 2048, dropout=True, has_bias=True, backend="cpu") == "dense"
    assert resolve_impl("auto", 4096, 2048, dropout=False, has_bias=True, backend="gpu", dtype="bfloat16") == "cudnn"
    assert resolve_impl("auto", 4096, 2048, dropout=False, has_bias=True, backend="gpu") == "blockwise"  # f32
    assert resolve_impl("auto", 4096, 2048, dropout=False, has_bias=True, backend="tpu") == "blockwise"
    assert resolve_impl("auto", 4096, 2048, dropout=False, has_bias=False, backend="tpu") == "pallas_tpu"


def test_config_refuses_dropout_and_unknown_impls():
    with pytest.raises(UserError, match="dropout_rate=0"):
        get_config("tiny", attention_impl="blockwise", dropout_rate=0.1)
    with pytest.raises(UserError, match="choose from"):
        get_config("tiny", attention_impl="flash")
    get_config("tiny", attention_impl="auto", dropout_rate=0.1)  # auto runs dense while dropout is on


# --- Whole models ---------------------------------------------------------------------------------------

_BLOCKS = dict(attention_block_q=8, attention_block_k=16)


def _batch(rng, enc_len=37, dec_len=21, packed=False):
    enc = rng.integers(2, 500, (2, enc_len)).astype(np.int32)
    enc[1, 29:] = 0  # padding
    dec_tgt = rng.integers(2, 500, (2, dec_len)).astype(np.int32)
    dec_tgt[0, 17:] = 0
    batch = dict(encoder_input_tokens=enc, decoder_target_tokens=dec_tgt,
                 decoder_input_tokens=np.concatenate([np.zeros((2, 1), np.int32), dec_tgt[:, :-1]], axis=1))
    if packed:
        batch["encoder_segment_ids"] = np.repeat([[1, 2]], [15, enc_len - 15], axis=1).repeat(2, 0).astype(np.int32)
        batch["decoder_segment_ids"] = np.repeat([[1, 2]], [8, dec_len - 8], axis=1).repeat(2, 0).astype(np.int32)
        batch["encoder_positions"] = np.concatenate([np.arange(15), np.arange(enc_len - 15)])[None].repeat(2, 0)
        batch["decoder_positions"] = np.concatenate([np.arange(8), np.arange(dec_len - 8)])[None].repeat(2, 0)
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _valid_logits(logits, batch):
    return logits * (batch["decoder_target_tokens"] > 0)[..., None]  # padding positions are not compared


@pytest.mark.parametrize("overrides", [
    dict(position_scheme="t5_relative_bias"),
    dict(position_scheme="t5_relative_bias", scan_layers=True, packed=True),
    dict(position_scheme="alibi", num_kv_heads=2, qk_norm=True, attention_logit_softcap=5.0),
    dict(position_scheme="rope", num_kv_heads=1, packed=True),
    dict(position_scheme="absolute_learned"),
    dict(position_scheme="none", num_kv_heads=2),
], ids=["t5", "t5_scanned_packed", "alibi_gqa_qknorm_softcap", "rope_mqa_packed", "absolute", "none"])
def test_encoder_decoder_logits_equal_dense(overrides):
    overrides = dict(overrides)
    packed = overrides.pop("packed", False)
    dense_cfg = get_config("tiny", **overrides)
    params = init_params(dense_cfg, jax.random.key(1))
    batch = _batch(np.random.default_rng(0), packed=packed)
    logits = {}
    for impl in ("dense", "blockwise"):
        model = EncoderDecoder(dense_cfg.replace(attention_impl=impl, **_BLOCKS))
        logits[impl] = jax.jit(lambda p, b, m=model: m.apply({"params": p}, **b))(params, batch)
    assert _rel(_valid_logits(logits["dense"], batch), _valid_logits(logits["blockwise"], batch)) <= 1e-5


def test_prefix_lm_decoder_only_logits_equal_dense():
    cfg = get_config("tiny", decoder_only_prefix_lm=True)
    params = init_params(cfg, jax.random.key(2), decoder_only=True)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(2, 500, (2, 29)), jnp.int32)
    prefix = jnp.asarray(np.arange(29)[None] < np.array([[11], [6]]), jnp.int32)
    out = {impl: DecoderOnly(cfg.replace(attention_impl=impl, **_BLOCKS)).apply(
        {"params": params}, tokens, decoder_target_tokens=tokens, decoder_causal_attention=prefix)
        for impl in ("dense", "blockwise")}
    assert _rel(out["dense"], out["blockwise"]) <= 1e-5


def test_one_train_step_equals_dense():
    """T5 bias (its table trains), padding and cross-attention: the whole update, blockwise vs dense."""
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(4))
    batch = _batch(np.random.default_rng(5))
    optimizer = optax.sgd(1.0)
    new = {}
    for impl in ("dense", "blockwise"):
        model = EncoderDecoder(cfg.replace(attention_impl=impl, **_BLOCKS))
        state = TrainState.create(params, optimizer)
        new[impl], _ = jax.jit(lambda s, b, m=model: step_lib.train_step(s, b, model=m, optimizer=optimizer))(state,
                                                                                                            batch)
    for path, dense_p in jax.tree_util.tree_leaves_with_path(new["dense"].params):
        block_p = _at(new["blockwise"].params, path)
        delta = dense_p - _at(params, path)
        assert float(jnp.max(jnp.abs(delta))) > 0, jax.tree_util.keystr(path)  # every parameter moved
        assert _rel(delta, block_p - _at(params, path)) <= 1e-4, jax.tree_util.keystr(path)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.slow
def test_train_step_memory_grows_linearly_with_length():
    """Compiled train-step temp memory (XLA's analysis, CPU) at 512 / 2048 / 8192 input tokens per row and the
    same tokens per batch: blockwise stays ~flat (linear in length at a fixed batch), dense grows ~4x per step."""
    cfg = get_config("tiny", attention_impl="blockwise", attention_block_q=256, attention_block_k=256)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    optimizer = optax.sgd(0.1)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
    temps = {}
    for impl in ("blockwise", "dense"):
        model = EncoderDecoder(cfg.replace(attention_impl=impl))
        for length in (512, 2048, 8192):
            rows = 8192 // length
            batch = {k: jax.ShapeDtypeStruct((rows, length if k.startswith("encoder") else 64), jnp.int32)
                     for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
            compiled = jax.jit(lambda s, b, m=model: step_lib.train_step(s, b, model=m, optimizer=optimizer)
                               ).lower(state, batch).compile()
            temps[impl, length] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["blockwise", 8192] <= 2.0 * temps["blockwise", 512], temps
    assert temps["dense", 8192] >= 8.0 * temps["dense", 512], temps  # the quadratic scores the core avoids


def test_auto_in_the_model_and_greedy_decoding_equal_dense():
    """'auto' above its threshold runs blockwise in the model; generation (blockwise encoder and cross-attention
    over it, the cache path for the decoding steps) gives the dense model's tokens."""
    from t5lite.infer import generate

    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(6))
    batch = _batch(np.random.default_rng(7))
    auto = cfg.replace(attention_impl="auto", attention_auto_min_length=16, **_BLOCKS)
    logits = {c: EncoderDecoder(c).apply({"params": params}, **batch) for c in (cfg, auto)}
    assert _rel(_valid_logits(logits[cfg], batch), _valid_logits(logits[auto], batch)) <= 1e-5
    tokens = {c: generate(c, params, np.asarray(batch["encoder_input_tokens"]), max_decode_length=8)[0]
              for c in (cfg, cfg.replace(attention_impl="blockwise", **_BLOCKS))}
    np.testing.assert_array_equal(*tokens.values())


_ALL_REDUCE_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from t5lite.model.attention_core import AttentionSpec, attention_core
mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
q = jax.ShapeDtypeStruct((8, 512, 4, 16), jnp.float32, sharding=NamedSharding(mesh, P("data")))
table = jax.ShapeDtypeStruct((4, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
spec = AttentionSpec(position="t5", num_heads=4, block_q=128, block_k=128)
grad = jax.jit(jax.grad(lambda q, k, v, t: jnp.sum(attention_core(q, k, v, spec.replace(table=t)) ** 2),
                        argnums=(0, 1, 2, 3)))
print([line.split("=")[1].split("all-reduce(")[0].strip()
       for line in grad.lower(q, q, q, table).compile().as_text().splitlines() if "all-reduce(" in line])
"""


def test_bias_table_gradient_is_reduced_over_the_batch_once():
    """Data-parallel: the T5 table's gradient is summed over the batch shards once ([H, buckets]), not per block
    (an all-reduce of [H, bq, bk] in every block pair, 3 GiB per layer and step for t5_1_1_base at 8k inputs)."""
    import ast
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _ALL_REDUCE_PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert ast.literal_eval(out.strip().splitlines()[-1]) == ["f32[4,32]{1,0}"], out
