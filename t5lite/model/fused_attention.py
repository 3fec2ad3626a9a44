"""Fused attention kernels behind attention_core: cuDNN (GPU) and JAX's Pallas TPU flash attention.

Both take the position bias as a whole [B, H, q, k] array (`dense_bias`), which is quadratic in
length: for T5's relative bias and ALiBi at long lengths prefer `blockwise`, which computes it per
block ('auto' does so on TPU). Without a position bias the Pallas kernel needs no such array: padding
and packing become its segment ids and causality its own flag, so its memory stays linear.
Neither kernel soft-caps logits; both refuse it in one line.
"""

import jax
import jax.numpy as jnp

from t5lite.errors import UserError

_PAD_BIAS = -1e30  # keys added to reach the kernel's block multiple: never attended


def run(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, spec, dense_bias) -> jax.Array:
    """q [B, q, H, Dh], k / v [B, k, Hkv, Dh] -> [B, q, H, Dh]. `spec` is attention_core's AttentionSpec and
    `dense_bias(spec, q_len, k_len)` its whole [B, H, q, k] bias (passed in: the core imports this module)."""
    if spec.softcap is not None:
        raise UserError(f"attention_impl={impl!r} has no logit soft-capping; set attention_impl='blockwise'")
    return _cudnn(q, k, v, spec, dense_bias) if impl == "cudnn" else _pallas_tpu(q, k, v, spec, dense_bias)


def _cudnn(q, k, v, spec, dense_bias):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, got {q.dtype}; set "
                        "T5Config.dtype='bfloat16' or attention_impl='blockwise'")
    bias = dense_bias(spec, q.shape[1], k.shape[1]).astype(q.dtype)  # [B or 1, H or 1, q, k] incl. the masks
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation="cudnn")


def _pad_to(x, axis, multiple, value=0):
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pallas_tpu(q, k, v, spec, dense_bias):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, lq, h, dh = q.shape
    lk, groups = k.shape[1], h // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) if groups > 1 else x for x in (k, v))  # the kernel wants H k/v heads
    bq, bk = min(spec.block_q, _round_up(lq)), min(spec.block_k, _round_up(lk))
    heads_first = lambda x, block: _pad_to(jnp.swapaxes(x, 1, 2), 2, block)  # noqa: E731  [B, H, L', Dh]
    qp, kp, vp = heads_first(q, bq), heads_first(k, bk), heads_first(v, bk)
    ab, segments, causal = None, None, False
    if spec.position != "none" or spec.window is not None or spec.q_prefix is not None:
        # The bias (and every mask term) as one [B, H, q, k] array: quadratic in length.
        ab = jnp.broadcast_to(dense_bias(spec, lq, lk), (b, h, lq, lk))
        ab = _pad_to(_pad_to(ab, 2, bq, 0.0), 3, bk, _PAD_BIAS)
    else:
        causal = spec.causal
        segments = fa.SegmentIds(q=_segments(spec.q_valid, spec.q_segments, b, lq, bq, pad_id=-2),
                                 kv=_segments(spec.k_valid, spec.k_segments, b, lk, bk, pad_id=-1))
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                          block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                          block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qp, kp, vp, ab=ab, segment_ids=segments, causal=causal, sm_scale=1.0,
                             block_sizes=sizes)  # [B, H, q', Dh]
    return jnp.swapaxes(out[:, :, :lq], 1, 2)


def _round_up(n, multiple=128):
    return -(-n // multiple) * multiple


def _segments(valid, segments, b, length, block, pad_id):
    """Segment ids the kernel masks with: 0 for padding tokens (they meet only each other, whose outputs
    nobody reads), the packed segment otherwise, `pad_id` for the block padding (it meets nothing)."""
    ids = jnp.ones((b, length), jnp.int32) if segments is None else segments.astype(jnp.int32)
    if valid is not None:
        ids = jnp.where(valid, ids, 0)
    return _pad_to(ids, 1, block, pad_id)
