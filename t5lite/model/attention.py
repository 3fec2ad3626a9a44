"""Multi-head attention with T5's relative position bias, and the masks it runs under.

T5 attention has no 1/sqrt(head_dim) scaling of the scores (the query initializer folds it
in), no biases, and adds a learned bias per (head, relative-position bucket), one table per
stack shared by all its layers. Scores, bias and softmax are float32.
"""

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model.layers import DenseGeneral

# Added to the scores of masked (query, key) pairs; exp() of it underflows to exactly 0.
MASK_VALUE = -1e10


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Maps relative positions (key - query) to bucket ids, T5's scheme.

    Half the buckets hold exact small offsets, the other half log-spaced offsets up to
    max_distance; bidirectional splits the buckets between past and future. NumPy on the host
    (the offsets are static), in float32 like the reference implementations.
    """
    rp = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets += (rp > 0).astype(np.int64) * num_buckets
        n = np.abs(rp)
    else:
        n = np.maximum(-rp, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log of offsets >= max_exact only (the small branch covers the rest; avoids log(0)).
    ratio = np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, n, large)


@functools.lru_cache(maxsize=64)
def _bucket_table(q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int):
    rp = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # [q, k]
    return relative_position_bucket(rp, bidirectional, num_buckets, max_distance).astype(np.int32)


class RelativePositionBias(nn.Module):
    """The learned [heads, buckets] table, expanded to a [1, H, q, k] additive score bias.

    With `q_offset` (decoding on a cache) the queries are positions q_offset..q_offset+q_len-1
    against keys 0..k_len-1.
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset: Optional[jax.Array] = None) -> jax.Array:
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                         ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), jnp.float32)
        if q_offset is None:
            buckets = jnp.asarray(_bucket_table(q_len, k_len, self.bidirectional, self.num_buckets, self.max_distance))
        else:
            full = jnp.asarray(_bucket_table(k_len, k_len, self.bidirectional, self.num_buckets, self.max_distance))
            buckets = jax.lax.dynamic_slice_in_dim(full, q_offset, q_len, axis=0)  # [q, k]
        bias = jnp.take(table, buckets, axis=1)  # [H, q, k]
        return bias[None]  # [1, H, q, k]


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """[B, q] x [B, k] booleans -> [B, 1, q, k] mask, True where the pair may attend."""
    return jnp.logical_and(query_valid[:, None, :, None], key_valid[:, None, None, :])


def make_segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """Packed rows: [B, 1, q, k] True only within the same segment."""
    return jnp.equal(query_segments[:, None, :, None], key_segments[:, None, None, :])


def make_causal_mask(length: int, prefix: Optional[jax.Array] = None) -> jax.Array:
    """[1 or B, 1, L, L] lower-triangular mask; with a [B, L] `prefix` flag the prefix is bidirectional."""
    idx = jnp.arange(length)
    causal = (idx[None, :] <= idx[:, None])[None, None]  # [1, 1, L, L]
    if prefix is None:
        return causal
    prefix = prefix.astype(bool)
    return jnp.logical_or(causal, jnp.logical_and(prefix[:, None, :, None], prefix[:, None, None, :]))


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask -> float32 additive bias (0 where allowed, MASK_VALUE where not)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


class MultiHeadAttention(nn.Module):
    """Bias-free multi-head attention (self or cross) under an additive float32 score bias.

    Decoding (`decode=True`) keeps keys/values in the 'cache' collection. The first call
    creates it: self-attention allocates [B, cache_length, H, Dh] zeros; cross-attention
    projects the encoder output once. Later calls take one query
    at `decode_position`, write its key/value there and attend over the whole cache (the
    caller's bias masks positions not yet written).
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    is_cross: bool = False
    decode: bool = False
    cache_length: Optional[int] = None  # self-attention cache slots; default: the first call's length

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array], bias: jax.Array,
                 deterministic: bool, decode_position: Optional[jax.Array] = None) -> jax.Array:
        emb_dim = inputs_q.shape[-1]
        heads = (self.num_heads, self.head_dim)
        qkv_axes = ("embed", "heads", "kv")
        fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        # T5 folds the 1/sqrt(head_dim) score scaling into the query initializer.
        query_init = lambda *a: fan_in(*a) / math.sqrt(self.head_dim)  # noqa: E731
        project = functools.partial(DenseGeneral, heads, qkv_axes, dtype=self.dtype)
        q = project(kernel_init=query_init, name="query")(inputs_q)  # [B, q, H, Dh]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        key, value = project(kernel_init=fan_in, name="key"), project(kernel_init=fan_in, name="value")
        if self.decode and self.is_cross and self.has_variable("cache", "cross_key"):
            k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        else:
            k, v = key(inputs_kv), value(inputs_kv)  # [B, k, H, Dh]
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
        if self.decode:
            k, v = self._use_cache(k, v, decode_position)

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # [B, H, q, k]
        weights = jax.nn.softmax(scores + bias, axis=-1)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", jnp.asarray(weights, self.dtype), v)  # [B, q, H, Dh]
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return DenseGeneral(emb_dim, ("heads", "kv", "embed"), num_contracting=2, dtype=self.dtype,
                            kernel_init=fan_in, name="out")(out)

    def _use_cache(self, k: jax.Array, v: jax.Array, decode_position: Optional[jax.Array]):
        if self.is_cross:
            if not self.has_variable("cache", "cross_key"):
                self.put_variable("cache", "cross_key", k)
                self.put_variable("cache", "cross_value", v)
            return k, v
        initialized = self.has_variable("cache", "cached_key")
        shape = (k.shape[0], self.cache_length or k.shape[1], *k.shape[2:])  # [B, Lmax, H, Dh]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        if not initialized or decode_position is None:
            return k, v
        start = (0, decode_position, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
        return cached_k.value, cached_v.value
