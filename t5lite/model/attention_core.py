"""ONE attention core: softmax(cap(q.k) + position bias + mask) . v, from an AttentionSpec.

`attention_core(q, k, v, spec)` runs the implementation the spec names:
  dense       the reference: materialises the [B, H, q, k] bias from the spec (quadratic memory)
  blockwise   the FlashAttention recurrence in JAX: online softmax over key blocks inside a loop
              over query blocks; a custom_vjp whose backward recomputes each block instead of
              storing probabilities, so memory is linear in length. The position bias (T5 buckets,
              ALiBi slopes x distance) and the masks are computed per block from row indices,
              segment ids and validity flags; nothing [q, k]-shaped outlives a block.
  cudnn       jax.nn.dot_product_attention(implementation='cudnn') with the materialised bias (GPU)
  pallas_tpu  JAX's Pallas TPU flash attention; its `ab` bias is a full [B, H, q, k] array
A mask is a conjunction of terms, each a function of (query row, key row) that a block evaluates:
validity, packed segments, causal (or prefix-LM: causal OR both in the prefix) and a window
|q - k| < w (causal: 0 <= q - k < w). A block whose mask is all False could be skipped (later).
Masked pairs get MASK_VALUE *added*, exactly like the dense model path, so even a fully masked
row (a padding query) comes out the same: uniform over the real keys.
"""

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.errors import UserError
from t5lite.model import fused_attention
from t5lite.model.config import ATTENTION_IMPLS as IMPLS

MASK_VALUE = -1e10  # added to the scores of masked pairs; exp() of it underflows to exactly 0
_PAD_VALUE = -1e30  # keys past the real length (block padding): never attended, even by masked rows
POSITION_BIASES = ("none", "t5", "alibi")


@flax.struct.dataclass
class AttentionSpec:
    """What one attention call attends under: masks as per-row arrays, the position bias as its parameters.

    Arrays are [B, q] (queries) or [B, k] (keys); None means "no such term". `table` is T5's
    [H, buckets] relative-bias table (differentiated). Rows are indices in the (packed) row, as
    relative schemes need: key - query offsets inside a segment equal offsets in the row.
    """

    q_valid: Optional[jax.Array] = None  # [B, q] bool
    k_valid: Optional[jax.Array] = None  # [B, k] bool
    q_segments: Optional[jax.Array] = None  # [B, q] int
    k_segments: Optional[jax.Array] = None  # [B, k] int
    q_prefix: Optional[jax.Array] = None  # [B, q] bool: prefix-LM, the prefix attends bidirectionally
    k_prefix: Optional[jax.Array] = None  # [B, k] bool
    table: Optional[jax.Array] = None  # [H, buckets] float32 (position == 't5')
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    window: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # |q - k| < window
    position: str = flax.struct.field(pytree_node=False, default="none")  # one of POSITION_BIASES
    bidirectional: bool = flax.struct.field(pytree_node=False, default=True)  # T5 bucket function
    num_buckets: int = flax.struct.field(pytree_node=False, default=32)
    max_distance: int = flax.struct.field(pytree_node=False, default=128)
    num_heads: int = flax.struct.field(pytree_node=False, default=1)
    softcap: Optional[float] = flax.struct.field(pytree_node=False, default=None)  # cap * tanh(s / cap)
    impl: str = flax.struct.field(pytree_node=False, default="blockwise")
    block_q: int = flax.struct.field(pytree_node=False, default=512)
    block_k: int = flax.struct.field(pytree_node=False, default=512)


def resolve_impl(impl: str, max_length: int, auto_min_length: int, dropout: bool, has_bias: bool,
                 backend: Optional[str] = None, dtype: str = "float32", softcap: Optional[float] = None) -> str:
    """The implementation `impl` runs as. 'auto': dense below auto_min_length tokens or while attention
    dropout is on; else on GPU cudnn (bf16 / fp16, no soft-capping), on TPU pallas_tpu when there is no
    position bias and no soft-capping (its bias would be a quadratic array), otherwise blockwise."""
    if impl != "auto":
        return impl
    if dropout or max_length < auto_min_length:
        return "dense"
    backend = backend or jax.default_backend()
    if backend == "gpu" and dtype in ("bfloat16", "float16") and softcap is None:
        return "cudnn"
    if backend == "tpu" and not has_bias and softcap is None:
        return "pallas_tpu"
    return "blockwise"


# --- Per-block bias and mask ------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _offset_buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5 bucket of every offset key - query in [-(q_len - 1), k_len - 1]: a [q_len + k_len - 1] table
    (linear in length) computed by positions.relative_position_bucket, so buckets equal the dense path's."""
    from t5lite.model.positions import relative_position_bucket  # positions imports this module's users
    offsets = np.arange(-(q_len - 1), k_len)
    return relative_position_bucket(offsets, bidirectional, num_buckets, max_distance).astype(np.int32)


def _alibi_slopes(num_heads: int) -> np.ndarray:
    from t5lite.model.positions import alibi_slopes
    return alibi_slopes(num_heads)


def block_buckets(spec: AttentionSpec, q_idx, k_idx, q_len: int, k_len: int) -> jax.Array:
    """[bq] x [bk] row indices -> [bq, bk] T5 bucket ids."""
    table = jnp.asarray(_offset_buckets(q_len, k_len, spec.bidirectional, spec.num_buckets, spec.max_distance))
    offset = jnp.clip(k_idx[None, :] - q_idx[:, None], -(q_len - 1), k_len - 1)  # [bq, bk]
    return table[offset + (q_len - 1)]


def block_position_bias(spec: AttentionSpec, table, q_idx, k_idx, q_len: int, k_len: int):
    """[H, bq, bk] float32 position bias of the (query rows q_idx, key rows k_idx) block, or None."""
    if spec.position == "t5":
        return jnp.take(table, block_buckets(spec, q_idx, k_idx, q_len, k_len), axis=1)
    if spec.position == "alibi":
        distance = jnp.abs(k_idx[None, :] - q_idx[:, None]).astype(jnp.float32)  # [bq, bk]
        return -jnp.asarray(_alibi_slopes(spec.num_heads))[:, None, None] * distance
    return None


# T5's bias in a block of contiguous rows depends only on the offset k - q, which takes bq + bk - 1 values:
# the blockwise path gathers the bias of those offsets ([H, bq + bk - 1]) and lays it out as the Toeplitz
# block by a skewing reshape, and sums its gradient along the block's diagonals the same way, instead of
# gathering (forward) and scatter-adding (backward) bq x bk elements per block.


def _offset_buckets_of_block(spec: AttentionSpec, qi, ki, bq: int, bk: int, q_len: int, k_len: int):
    """[bq + bk - 1] bucket ids of offsets ki * bk - (qi * bq + bq - 1) + c, c = 0 .. bq + bk - 2."""
    table = jnp.asarray(_offset_buckets(q_len, k_len, spec.bidirectional, spec.num_buckets, spec.max_distance))
    offsets = ki * bk - qi * bq - (bq - 1) + jnp.arange(bq + bk - 1)
    return table[jnp.clip(offsets, -(q_len - 1), k_len - 1) + (q_len - 1)]


def _toeplitz(vec: jax.Array, bq: int, bk: int) -> jax.Array:
    """[H, bq + bk - 1] -> [H, bq, bk] with out[h, i, j] = vec[h, j - i + bq - 1]."""
    h, n1 = vec.shape
    skewed = jnp.broadcast_to(vec[:, None, :], (h, bq, n1)).reshape(h, bq * n1)
    skewed = jnp.pad(skewed, ((0, 0), (0, bq))).reshape(h, bq, n1 + 1)[:, :, :bk]  # row r holds vec[r + j]
    return skewed[:, ::-1, :]


def _diagonal_sums(block: jax.Array) -> jax.Array:
    """[..., bq, bk] -> [..., bq + bk - 1]: sums over the diagonals j - i + bq - 1 = c (_toeplitz's transpose)."""
    lead, (bq, bk) = block.shape[:-2], block.shape[-2:]
    n = bq + bk
    pad = [(0, 0)] * len(lead) + [(0, 0), (0, bq)]
    flipped = jnp.pad(block[..., ::-1, :], pad)  # [..., bq, n]; row r is row bq - 1 - r
    skewed = flipped.reshape(lead + (bq * n,))[..., :bq * (n - 1)].reshape(lead + (bq, n - 1))  # (r, j) -> (r, r + j)
    return skewed.sum(axis=-2)


def block_mask(spec: AttentionSpec, masks: dict, q_idx, k_idx) -> Optional[jax.Array]:
    """[B or 1, bq, bk] True where the pair may attend (None: all may). `masks` holds this block's
    slices of the spec's arrays ([B, bq] / [B, bk]); each term is one more conjunct."""
    terms = []
    if spec.causal:
        causal = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, bq, bk]
        if masks.get("q_prefix") is not None:
            causal = causal | (masks["q_prefix"][:, :, None] & masks["k_prefix"][:, None, :])
        terms.append(causal)
    if spec.window is not None:
        delta = q_idx[:, None] - k_idx[None, :]
        near = (delta >= 0) & (delta < spec.window) if spec.causal else jnp.abs(delta) < spec.window
        terms.append(near[None])
    if masks.get("q_valid") is not None:
        terms.append(masks["q_valid"][:, :, None])
    if masks.get("k_valid") is not None:
        terms.append(masks["k_valid"][:, None, :])
    if masks.get("q_segments") is not None:
        terms.append(masks["q_segments"][:, :, None] == masks["k_segments"][:, None, :])
    if not terms:
        return None
    return functools.reduce(jnp.logical_and, terms)


def _spec_masks(spec: AttentionSpec) -> dict:
    names = ("q_valid", "k_valid", "q_segments", "k_segments", "q_prefix", "k_prefix")
    masks = {n: getattr(spec, n) for n in names if getattr(spec, n) is not None}
    if ("q_segments" in masks) != ("k_segments" in masks) or ("q_prefix" in masks) != ("k_prefix" in masks):
        raise ValueError("segment ids and prefix flags come in query/key pairs")
    return masks


def dense_bias(spec: AttentionSpec, q_len: int, k_len: int) -> jax.Array:
    """The whole [B or 1, H, q, k] float32 bias (mask + position): what dense / cudnn / pallas add."""
    q_idx, k_idx = jnp.arange(q_len), jnp.arange(k_len)
    mask = block_mask(spec, _spec_masks(spec), q_idx, k_idx)
    bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if mask is None else jnp.where(mask, 0.0, MASK_VALUE)[:, None]
    position = block_position_bias(spec, spec.table, q_idx, k_idx, q_len, k_len)
    return bias if position is None else bias + position[None]


# --- The implementations ----------------------------------------------------------------------------


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """q [B, q, H, Dh], k / v [B, k, Hkv, Dh] (Hkv divides H) -> [B, q, H, Dh] in v's dtype."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{k.shape[2]} key/value heads must divide {q.shape[2]} query heads")
    if spec.impl == "dense":
        return _dense(q, k, v, spec)
    if spec.impl == "blockwise":
        table = spec.table if spec.table is not None else jnp.zeros((q.shape[2], 1), jnp.float32)
        return _blockwise(_static(spec), q, k, v, table, _spec_masks(spec))
    if spec.impl in ("cudnn", "pallas_tpu"):
        return fused_attention.run(spec.impl, q, k, v, spec, dense_bias)
    raise UserError(f"unknown attention_impl {spec.impl!r}; choose from {', '.join(IMPLS)}")


def _softcap(scores, cap):
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def _dense(q, k, v, spec: AttentionSpec) -> jax.Array:
    """The reference: scores [B, H, q, k] in float32, the whole bias, softmax, weighted sum."""
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    grouped = q.reshape(b, lq, hkv, h // hkv, dh)
    scores = jnp.einsum("bqngd,bknd->bngqk", grouped, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores.reshape(b, h, lq, k.shape[1]), spec.softcap)
    weights = jax.nn.softmax(scores + dense_bias(spec, lq, k.shape[1]), axis=-1)  # [B, H, q, k]
    weights = weights.reshape(b, hkv, h // hkv, lq, k.shape[1]).astype(v.dtype)
    return jnp.einsum("bngqk,bknd->bqngd", weights, v).reshape(b, lq, h, dh)


def _static(spec: AttentionSpec) -> AttentionSpec:
    """The spec without its arrays: a hashable static argument of the custom_vjp."""
    return spec.replace(q_valid=None, k_valid=None, q_segments=None, k_segments=None, q_prefix=None,
                        k_prefix=None, table=None)


def _blocks(x: jax.Array, block: int, axis: int = 1) -> jax.Array:
    """Pads `axis` to a multiple of `block` and moves the block index first: [n, ..., block, ...]."""
    length = x.shape[axis]
    n = -(-length // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - length)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _layout(spec, q, k, v, masks):
    """Blocked operands: q [nq, B, bq, Hkv, G, Dh], k / v [nk, B, bk, Hkv, Dh], masks [n, B, b]."""
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq, bk = min(spec.block_q, lq), min(spec.block_k, lk)
    qb = _blocks(q.reshape(b, lq, hkv, h // hkv, dh), bq)
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    mb = {n: _blocks(m, bq if n.startswith("q") else bk) for n, m in masks.items()}
    return qb, kb, vb, mb, bq, bk


def _block_scores(spec, table, qblk, kblk, qmask, kmask, qi, ki, bq, bk, lq, lk):
    """One block's scores [B, Hkv, G, bq, bk] float32 after cap, bias and mask, and tanh(raw / cap)."""
    raw = jnp.einsum("bqngd,bknd->bngqk", qblk, kblk, preferred_element_type=jnp.float32)
    tanh = None
    if spec.softcap is not None:
        tanh = jnp.tanh(raw / spec.softcap)
        raw = spec.softcap * tanh
    q_idx, k_idx = qi * bq + jnp.arange(bq), ki * bk + jnp.arange(bk)
    s = raw
    if spec.position == "t5":  # gathered per offset, laid out by a reshape (see _toeplitz)
        position = _toeplitz(jnp.take(table, _offset_buckets_of_block(spec, qi, ki, bq, bk, lq, lk), axis=1), bq, bk)
    else:
        position = block_position_bias(spec, table, q_idx, k_idx, lq, lk)  # [H, bq, bk]
    if position is not None:
        s = s + position.reshape((1,) + raw.shape[1:])
    mask = block_mask(spec, {**qmask, **kmask}, q_idx, k_idx)  # [B or 1, bq, bk]
    if mask is not None:
        s = s + jnp.where(mask, 0.0, MASK_VALUE)[:, None, None]
    s = jnp.where((k_idx < lk)[None, None, None, None, :], s, _PAD_VALUE)
    return s, tanh, q_idx, k_idx


def _split_masks(mb, index_q=None, index_k=None):
    qmask = {n: m[index_q] for n, m in mb.items() if n.startswith("q")} if index_q is not None else {}
    kmask = {n: m[index_k] for n, m in mb.items() if n.startswith("k")} if index_k is not None else {}
    return qmask, kmask


def _forward(spec, q, k, v, table, masks):
    """-> out [B, q, H, Dh] in v's dtype, plus what the backward needs: the normalised blocks and each
    query row's softmax max and sum."""
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    qb, kb, vb, mb, bq, bk = _layout(spec, q, k, v, masks)
    nk = kb.shape[0]

    def one_query_block(args):
        qi, qblk = args
        qmask, _ = _split_masks(mb, index_q=qi)

        def step(carry, ki):
            o, m, total = carry  # o [B, Hkv, G, bq, Dh] f32; max m, sum total [B, Hkv, G, bq]
            _, kmask = _split_masks(mb, index_k=ki)
            s, _, _, _ = _block_scores(spec, table, qblk, kb[ki], qmask, kmask, qi, ki, bq, bk, lq, lk)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bngqk,bknd->bngqd", p.astype(v.dtype), vb[ki], preferred_element_type=jnp.float32)
            return (o * correction[..., None] + pv, m_new, total * correction + p.sum(-1)), None

        shape = (b, hkv, h // hkv, bq)
        init = (jnp.zeros(shape + (dh,), jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
                jnp.zeros(shape, jnp.float32))
        (o, m, total), _ = jax.lax.scan(step, init, jnp.arange(nk))
        # m and total stay apart: m + log(total) would round the log away when a fully masked row has m ~ -1e10.
        return o / total[..., None], (m, total)

    out, lse = jax.lax.map(one_query_block, (jnp.arange(qb.shape[0]), qb))  # [nq, B, Hkv, G, bq, (Dh)]
    result = jnp.moveaxis(out, 4, 1).reshape(qb.shape[0] * bq, b, h, dh)  # rows first: [nq * bq, B, H, Dh]
    result = jnp.moveaxis(result, 0, 1)[:, :lq].astype(v.dtype)  # [B, q, H, Dh]
    return result, (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(spec, q, k, v, table, masks):
    return _forward(spec, q, k, v, table, masks)[0]


def _blockwise_fwd(spec, q, k, v, table, masks):
    result, (out, lse) = _forward(spec, q, k, v, table, masks)
    return result, (q, k, v, table, masks, out, lse)


def _blockwise_bwd(spec, residuals, d_result):
    """FlashAttention-2's backward: per query block, recompute each key block's probabilities from the
    saved log-sum-exp, accumulate dq for the block and dk / dv / d(bias table) for the whole row."""
    q, k, v, table, masks, out, lse = residuals
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    qb, kb, vb, mb, bq, bk = _layout(spec, q, k, v, masks)
    nq, nk = qb.shape[0], kb.shape[0]
    dob = _blocks(d_result.reshape(b, lq, hkv, h // hkv, dh), bq).astype(jnp.float32)  # [nq, B, bq, Hkv, G, Dh]
    dob = jnp.moveaxis(dob, 2, 4)  # [nq, B, Hkv, G, bq, Dh], the layout of `out`
    delta = jnp.sum(dob * out, axis=-1)  # [nq, B, Hkv, G, bq]

    def one_query_block(carry, xs):
        dk, dv, dtable = carry
        qi, qblk, do, lse_blk, delta_blk = xs
        qmask, _ = _split_masks(mb, index_q=qi)

        def step(inner, ki):
            dq, dk, dv, dtable = inner
            _, kmask = _split_masks(mb, index_k=ki)
            s, tanh, q_idx, k_idx = _block_scores(spec, table, qblk, kb[ki], qmask, kmask, qi, ki, bq, bk, lq, lk)
            p = jnp.exp(s - lse_blk[0][..., None]) / lse_blk[1][..., None]  # [B, Hkv, G, bq, bk]
            dp = jnp.einsum("bngqd,bknd->bngqk", do, vb[ki].astype(jnp.float32))
            ds = p * (dp - delta_blk[..., None])  # d loss / d (scores + bias)
            if spec.position == "t5":  # per offset first (diagonal sums), then a small scatter into the buckets
                # Per example: summing over the (data-sharded) batch here would all-reduce in every block.
                per_offset = _diagonal_sums(ds.reshape(b, h, bq, bk))  # [B, H, bq + bk - 1]
                buckets = _offset_buckets_of_block(spec, qi, ki, bq, bk, lq, lk)
                dtable = dtable.at[:, :, buckets].add(per_offset)
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            dq = dq + jnp.einsum("bngqk,bknd->bqngd", ds, kb[ki].astype(jnp.float32))
            dk = dk.at[ki].add(jnp.einsum("bngqk,bqngd->bknd", ds, qblk.astype(jnp.float32)))
            dv = dv.at[ki].add(jnp.einsum("bngqk,bngqd->bknd", p, do))
            return (dq, dk, dv, dtable), None

        dq0 = jnp.zeros(qblk.shape, jnp.float32)
        (dq, dk, dv, dtable), _ = jax.lax.scan(step, (dq0, dk, dv, dtable), jnp.arange(nk))
        return (dk, dv, dtable), dq

    dtable0 = jnp.zeros((b,) + table.shape, jnp.float32)  # [B, H, buckets]: summed over the batch once, at the end
    init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32), dtable0)
    (dk, dv, dtable), dq = jax.lax.scan(one_query_block, init, (jnp.arange(nq), qb, dob, lse, delta))
    dtable = dtable.sum(0).astype(table.dtype)

    def unblock(x, length):  # [n, B, blk, ...] -> [B, length, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]

    dq = unblock(dq, lq).reshape(b, lq, h, dh).astype(q.dtype)
    masks_ct = jax.tree.map(lambda m: np.zeros(m.shape, jax.dtypes.float0), masks)
    return dq, unblock(dk, lk).astype(k.dtype), unblock(dv, lk).astype(v.dtype), dtable, masks_ct


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
