"""Attention (self or cross; multi-head, grouped-query or multi-query) and the masks it runs under.

T5 attention has no 1/sqrt(head_dim) scaling of the scores (the query initializer folds it
in) and no biases; position information arrives as an additive score bias and / or rotary
angles from the stack's positions module (t5lite/model/positions.py). Scores, bias and
softmax are float32. `num_kv_heads` < `num_heads` shares each key/value head among a group of
query heads (GQA; 1 is MQA), which shrinks the k/v projections and the KV cache alike.
"""

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.model.attention_core import MASK_VALUE, AttentionSpec, attention_core
from t5lite.model.config import T5Config
from t5lite.model.layers import DenseGeneral, RMSNorm
from t5lite.model.positions import Rotary, apply_rotary
from t5lite.registry import register

__all__ = ["MASK_VALUE", "MultiHeadAttention", "make_attention_mask", "make_causal_mask", "make_segment_mask",
           "mask_to_bias"]


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


@register("attention", "multi_head")
class MultiHeadAttention(nn.Module):
    """Bias-free attention (self or cross) under an additive float32 score bias.

    Decoding (`decode=True`) keeps keys/values in the 'cache' collection, heads first
    ([B, kv_heads, length, Dh], see `_use_cache`). The first call creates it: self-attention
    allocates cache_length zero slots; cross-attention projects the encoder output once. Later
    calls take the queries at `decode_position`, write their keys/values there and attend over
    the whole cache (the caller's bias masks slots not yet written). A cross-attention cache with
    fewer rows than the queries is shared by consecutive query rows (beam search: an example's
    beams). Subclasses may override `scores` (e.g. another similarity) and keep the rest.
    `bias` is either a float32 [B or 1, H, q, k] array (the dense path, which `scores` serves) or an
    AttentionSpec (t5lite/model/attention_core.py: masks and position bias computed per block there).
    """

    config: T5Config
    is_cross: bool = False
    decode: bool = False
    cache_length: Optional[int] = None  # self-attention cache slots; default: the first call's length
    # Sliding-window layers: a ring of this many slots (position p in slot p % cache_window) instead; the keys
    # attended are the ring (as it was before this call) then the new tokens, masked by the caller's bias.
    cache_window: Optional[int] = None

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array], bias: jax.Array,
                 deterministic: bool, rotary: Optional[Rotary] = None,
                 decode_position: Optional[jax.Array] = None) -> jax.Array:
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        emb_dim = inputs_q.shape[-1]
        fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        # T5 folds the 1/sqrt(head_dim) score scaling into the query initializer.
        query_init = lambda *a: fan_in(*a) / math.sqrt(cfg.head_dim)  # noqa: E731
        joined = cfg.attention_layout == "joined"  # kernels [embed, heads * Dh]: see T5Config.attention_layout
        q = DenseGeneral((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), dtype=dtype, kernel_init=query_init,
                         joined_axes=("embed", "heads") if joined else None, name="query")(inputs_q)  # [B, q, H, Dh]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        project = functools.partial(DenseGeneral, (cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"),
                                    dtype=dtype, kernel_init=fan_in,
                                    joined_axes=("embed", "kv_heads") if joined else None)
        key, value = project(name="key"), project(name="value")
        cached_cross = self.decode and self.is_cross and self.has_variable("cache", "cross_key")
        if cached_cross:
            k = _from_cache_layout(self.get_variable("cache", "cross_key"))
            v = _from_cache_layout(self.get_variable("cache", "cross_value"))
        else:
            k, v = key(inputs_kv), value(inputs_kv)  # [B, k, Hkv, Dh]
        if cfg.qk_norm:  # normalised heads lose the folded-in scaling: scale explicitly
            q = RMSNorm(cfg, "kv", name="query_norm")(q)
            if not cached_cross:
                k = RMSNorm(cfg, "kv", name="key_norm")(k)
        if cfg.query_pre_attn_scalar is not None or cfg.qk_norm:  # scaling q scales every score alike
            q = q * jnp.asarray((cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5, dtype)
        if rotary is not None:  # self-attention: q and k at the current tokens' positions
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))
        if self.decode:
            k, v = self._use_cache(k, v, decode_position)
        if isinstance(bias, AttentionSpec):  # the stack chose a non-dense attention core
            out = attention_core(q, k, v, bias)  # [B, q, H, Dh]
            return self._project_out(out, emb_dim, dtype, fan_in)
        q_shape = q.shape
        rows = q_shape[0] // k.shape[0]
        if cached_cross and rows > 1:
            # Beam search: each example's cross-attention cache serves its `rows` beams (consecutive query
            # rows), which attend as one row of rows x q queries: keys and values are read once, not per beam.
            q = _rows_as_queries(q, rows, axis=1)  # [B, rows * q, H, Dh]
            bias = _rows_as_queries(jnp.broadcast_to(bias, q_shape[:1] + bias.shape[1:]), rows, axis=2)

        scores = self.scores(q, k)  # [B, H, q, k] float32
        if cfg.attention_logit_softcap is not None:
            cap = cfg.attention_logit_softcap
            scores = cap * jnp.tanh(scores / cap)
        weights = jax.nn.softmax(scores + bias, axis=-1)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
        out = self.weighted_sum(jnp.asarray(weights, dtype), v).reshape(q_shape)  # [B, q, H, Dh]
        return self._project_out(out, emb_dim, dtype, fan_in)

    def _project_out(self, out: jax.Array, emb_dim: int, dtype, kernel_init) -> jax.Array:
        """[B, q, H, Dh] -> [B, q, D]."""
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        joined = ("heads", "embed") if self.config.attention_layout == "joined" else None
        return DenseGeneral(emb_dim, ("heads", "kv", "embed"), num_contracting=2, dtype=dtype,
                            kernel_init=kernel_init, joined_axes=joined, name="out")(out)

    def scores(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """q [B, q, H, Dh] . k [B, k, Hkv, Dh] -> float32 scores [B, H, q, k]; each key head serves H/Hkv queries."""
        groups = self.config.num_heads // k.shape[2]
        if groups == 1:
            return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        b, lq, _, dh = q.shape
        grouped = q.reshape(b, lq, k.shape[2], groups, dh)  # query head h = kv head h // groups
        scores = jnp.einsum("bqngd,bknd->bngqk", grouped, k, preferred_element_type=jnp.float32)
        return scores.reshape(b, self.config.num_heads, lq, k.shape[1])

    def weighted_sum(self, weights: jax.Array, v: jax.Array) -> jax.Array:
        """weights [B, H, q, k] x v [B, k, Hkv, Dh] -> [B, q, H, Dh]."""
        groups = self.config.num_heads // v.shape[2]
        if groups == 1:
            return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        b, _, lq, lk = weights.shape
        grouped = weights.reshape(b, v.shape[2], groups, lq, lk)
        out = jnp.einsum("bngqk,bknd->bqngd", grouped, v)
        return out.reshape(b, lq, self.config.num_heads, v.shape[-1])

    def _use_cache(self, k: jax.Array, v: jax.Array, decode_position: Optional[jax.Array]):
        """Stores k, v [B, k, Hkv, Dh] in the cache, heads first, and returns what the queries attend to.

        Heads-first caches are what the attention matmuls read without copying: in the [B, k, Hkv, Dh]
        layout XLA's CPU backend transposes every cached key and value, of every layer, at every step.
        `scores` and `weighted_sum` still see [B, k, Hkv, Dh]: a transposed view that XLA folds into the dots.
        """
        if self.is_cross:
            if not self.has_variable("cache", "cross_key"):
                # The barrier keeps XLA from cancelling this transpose against the view taken at each step
                # (it would then carry [B, k, Hkv, Dh] through the decoding loop and transpose it every step).
                cross_k, cross_v = jax.lax.optimization_barrier((_to_cache_layout(k), _to_cache_layout(v)))
                self.put_variable("cache", "cross_key", cross_k)
                self.put_variable("cache", "cross_value", cross_v)
            return k, v
        initialized = self.has_variable("cache", "cached_key")
        slots = self.cache_window or self.cache_length or k.shape[1]
        shape = (k.shape[0], k.shape[2], slots, k.shape[3])  # [B, Hkv, Lmax or window, Dh]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        if not initialized or decode_position is None:
            return k, v
        if self.cache_window:
            return self._use_ring(cached_k, cached_v, k, v, decode_position)
        start = (0, 0, decode_position, 0)
        for cached, new in ((cached_k, k), (cached_v, v)):  # in place: the while loop's carry is not copied
            cached.value = jax.lax.dynamic_update_slice(cached.value, _to_cache_layout(new).astype(cached.value.dtype),
                                                        start)
        return _from_cache_layout(cached_k.value), _from_cache_layout(cached_v.value)

    def _use_ring(self, cached_k, cached_v, k: jax.Array, v: jax.Array, decode_position: jax.Array):
        """Writes the last (at most cache_window) of k, v [B, n, Hkv, Dh] into their ring slots; returns the ring
        as it was, then k, v: [B, cache_window + n, Hkv, Dh]."""
        n, w = k.shape[1], self.cache_window
        kept = min(n, w)
        slots = jnp.mod(decode_position + n - kept + jnp.arange(kept), w)
        out = []
        for cached, new in ((cached_k, k), (cached_v, v)):
            out.append(jnp.concatenate([_from_cache_layout(cached.value), new.astype(cached.value.dtype)], axis=1))
            cached.value = cached.value.at[:, :, slots].set(_to_cache_layout(new[:, n - kept:]).astype(cached.value.dtype))
        return out[0], out[1]


def _rows_as_queries(x: jax.Array, rows: int, axis: int) -> jax.Array:
    """[B * rows, ..., q (at `axis`), ...] -> [B, ..., rows * q, ...]: each group of rows becomes one row's queries."""
    x = jnp.moveaxis(x, axis, 1)  # [B * rows, q, ...]
    x = x.reshape((x.shape[0] // rows, rows * x.shape[1]) + x.shape[2:])
    return jnp.moveaxis(x, 1, axis)


def _to_cache_layout(x: jax.Array) -> jax.Array:
    """[B, k, Hkv, Dh] -> the cache's heads-first [B, Hkv, k, Dh]."""
    return jnp.swapaxes(x, 1, 2)


def _from_cache_layout(x: jax.Array) -> jax.Array:
    """A cached [B, Hkv, k, Dh] tensor -> the [B, k, Hkv, Dh] view that attention computes with."""
    return jnp.swapaxes(x, 1, 2)
