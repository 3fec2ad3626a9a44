"""The fused kernels behind attention_core equal the dense reference: JAX's Pallas TPU flash attention in
interpret mode on CPU (forward and gradients, with and without a position bias), cuDNN on a GPU only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from t5lite.errors import UserError
from t5lite.model.attention_core import AttentionSpec, attention_core

B, L, H, DH = 1, 200, 2, 16  # 200: padded to the kernel's 128-row blocks


def _operands(kv_heads=2, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, L, H, DH), jnp.float32)
    k, v = (jnp.asarray(r.randn(B, L, kv_heads, DH), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(r.randn(H, 32), jnp.float32)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def _check(spec, kv_heads, rows):
    """Forward and gradients on the query rows `rows` (padding rows' outputs are nobody's input)."""
    q, k, v, table = _operands(kv_heads)

    def loss(q, k, v, table, impl):
        out = attention_core(q, k, v, spec.replace(impl=impl, table=table))[:, rows]
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, ref), ref_grads = grad(q, k, v, table, "dense")
    with pltpu.force_tpu_interpret_mode():
        (_, got), got_grads = grad(q, k, v, table, "pallas_tpu")
    assert _rel(ref, got) <= 1e-5
    for name, a, b in zip(("q", "k", "v", "table"), ref_grads, got_grads):
        if spec.position == "t5" or name != "table":
            assert _rel(a, b) <= 1e-4, name


@pytest.mark.slow
def test_pallas_tpu_with_t5_bias_equals_dense():
    valid = jnp.arange(L)[None] < 170
    spec = AttentionSpec(q_valid=valid, k_valid=valid, causal=True, bidirectional=False, position="t5",
                         num_heads=H, block_q=128, block_k=128)
    _check(spec, kv_heads=2, rows=slice(0, 170))


@pytest.mark.slow
def test_pallas_tpu_packed_causal_gqa_without_bias_equals_dense():
    segments = jnp.asarray(np.repeat([[1, 2]], [90, 110], axis=1))
    spec = AttentionSpec(q_segments=segments, k_segments=segments, causal=True, num_heads=H,
                         block_q=128, block_k=128)
    _check(spec, kv_heads=1, rows=slice(None))


def test_fused_kernels_refuse_soft_capping():
    q, k, v, _ = _operands()
    with pytest.raises(UserError, match="soft-capping"):
        attention_core(q, k, v, AttentionSpec(num_heads=H, softcap=5.0, impl="pallas_tpu"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: run `PYTHONPATH=$PWD python -m pytest -q "
                    "tests/test_fused_attention.py -k cudnn` on a CUDA host with jax[cuda12]")
def test_cudnn_with_t5_bias_equals_dense():
    q, k, v, table = (x.astype(jnp.bfloat16) for x in _operands())
    valid = jnp.arange(L)[None] < 170
    spec = AttentionSpec(q_valid=valid, k_valid=valid, position="t5", table=table.astype(jnp.float32), num_heads=H)
    ref = attention_core(q, k, v, spec.replace(impl="dense"))[:, :170].astype(jnp.float32)
    got = attention_core(q, k, v, spec.replace(impl="cudnn"))[:, :170].astype(jnp.float32)
    assert _rel(ref, got) <= 2e-2  # bfloat16
