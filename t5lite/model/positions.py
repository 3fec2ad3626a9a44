"""Position schemes: T5 relative bias, absolute learned, sinusoidal, RoPE, ALiBi, none.

Each stack (encoder, decoder) owns one positions module, chosen by `T5Config.position_scheme`
from the registry, and calls it once:

    x, bias, rotary = positions(x, token_positions, key_length, query_offset)

x [B, L, D]           the token embeddings, with absolute position embeddings added (or not)
token_positions       [B, L] position of each token (packed segments restart at 0), or None:
                      query_offset + arange(L)
key_length            keys the self-attention scores cover (L, or the KV cache length)
query_offset          when decoding on a cache: the cache slot of the first query, else None
bias                  [1 or B, H, L, key_length] float32 added to every self-attention score, or None
                      (with `per_block=True`, which schemes with a `block_bias` accept: the bias's
                      parameters as AttentionSpec fields, for attention that computes it per block)
rotary                (sin, cos) [B, L, rotary_dim / 2] that self-attention rotates q and k by, or None

Relative schemes (T5 bias, ALiBi) depend only on key - query offsets inside a segment, which
equal offsets in the (packed or cached) row, so they need no positions; absolute schemes and
RoPE use the token positions. Cross-attention has no position information, as in T5.
"""

import functools
import math
from typing import ClassVar, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.errors import UserError
from t5lite.model.config import T5Config
from t5lite.registry import register

Rotary = Tuple[jax.Array, jax.Array]


def token_positions(positions: Optional[jax.Array], length: int, offset: Optional[jax.Array] = None) -> jax.Array:
    """The given [B, L] positions, or [1, L] offset + arange(L) when there are none."""
    if positions is not None:
        return positions
    start = 0 if offset is None else offset
    return (start + jnp.arange(length, dtype=jnp.int32))[None]


class NoPositions(nn.Module):
    """No position information (NoPE): the decoder's causal mask is its only notion of order."""

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "positions"  # the module's name in its stack (its parameters' path)

    def __call__(self, x, positions, key_length, query_offset=None):
        return x, None, None


register("positions", "none")(NoPositions)


# --- T5's relative position bias -----------------------------------------------------------------


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


@register("positions", "t5_relative_bias")
class RelativePositionBias(nn.Module):
    """T5: a learned [heads, buckets] table, expanded to a [1, H, q, k] additive score bias.

    One table per stack, shared by its layers. With `query_offset` (decoding on a cache) the
    queries are positions query_offset.. against keys 0..key_length-1.
    """

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "relpos_bias"
    block_bias: ClassVar[str] = "t5"  # attention_core can compute this bias per block

    @nn.compact
    def __call__(self, x, positions, key_length, query_offset=None, per_block=False):
        cfg, q_len = self.config, x.shape[1]
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                         ("heads", "relpos_buckets")),
            (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.float32)
        if per_block:  # the [H, buckets] table and the bucket function's settings, no [q, k] array
            return x, dict(position="t5", table=table, bidirectional=self.bidirectional,
                           num_buckets=cfg.relative_attention_num_buckets,
                           max_distance=cfg.relative_attention_max_distance), None
        bucket_table = functools.partial(_bucket_table, bidirectional=self.bidirectional,
                                         num_buckets=cfg.relative_attention_num_buckets,
                                         max_distance=cfg.relative_attention_max_distance)
        if query_offset is None:
            buckets = jnp.asarray(bucket_table(q_len, key_length))
        else:
            full = jnp.asarray(bucket_table(key_length, key_length))
            buckets = jax.lax.dynamic_slice_in_dim(full, query_offset, q_len, axis=0)  # [q, k]
        bias = jnp.take(table, buckets, axis=1)  # [H, q, k]
        return x, bias[None], None  # [1, H, q, k]


# --- ALiBi (Press et al., 2022) ---------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The paper's head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of 2;
    otherwise those of the nearest lower power of 2, then every other slope of the next one."""
    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][:num_heads - lower]
    return np.asarray(slopes, np.float32)


@register("positions", "alibi")
class ALiBi(nn.Module):
    """Attention with linear biases: score bias -slope_h * |key - query|, no parameters.

    Symmetric in the encoder (the usual bidirectional extension); in the decoder the causal mask
    removes the future, which leaves the paper's -slope * (query - key).
    """

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "positions"
    block_bias: ClassVar[str] = "alibi"

    def __call__(self, x, positions, key_length, query_offset=None, per_block=False):
        if per_block:
            return x, dict(position="alibi"), None
        q_len = x.shape[1]
        start = 0 if query_offset is None else query_offset
        distance = jnp.abs(jnp.arange(key_length)[None, :] - (start + jnp.arange(q_len))[:, None])  # [q, k]
        slopes = jnp.asarray(alibi_slopes(self.config.num_heads))
        return x, (-slopes[:, None, None] * distance.astype(jnp.float32))[None], None  # [1, H, q, k]


# --- Absolute positions added to the embeddings ----------------------------------------------------


def sinusoidal_table(positions: jax.Array, dim: int) -> jax.Array:
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)).

    positions [...] int -> [..., dim] float32.
    """
    inv_freq = 1.0 / (10_000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # [ceil(dim / 2)]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., ceil(dim / 2)]
    interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., ceil(dim / 2), 2]
    return interleaved.reshape(*angles.shape[:-1], -1)[..., :dim]


@register("positions", "sinusoidal")
class Sinusoidal(nn.Module):
    """The original Transformer's fixed sinusoids, added to the token embeddings of each stack."""

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "positions"

    def __call__(self, x, positions, key_length, query_offset=None):
        pe = sinusoidal_table(token_positions(positions, x.shape[1], query_offset), x.shape[-1])  # [B, L, D]
        return x + pe.astype(x.dtype), None, None


@register("positions", "absolute_learned")
class AbsoluteLearned(nn.Module):
    """A learned [max_position_embeddings, D] table per stack, added to the token embeddings."""

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "position_embedder"

    @nn.compact
    def __call__(self, x, positions, key_length, query_offset=None):
        cfg = self.config
        longest = max(x.shape[1], key_length)
        if longest > cfg.max_position_embeddings:
            raise UserError(f"a sequence of {longest} positions exceeds max_position_embeddings="
                            f"{cfg.max_position_embeddings}; raise T5Config.max_position_embeddings or shorten it")
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                                                     ("abs_positions", "embed")),
                           (cfg.max_position_embeddings, x.shape[-1]), jnp.float32)
        pe = jnp.take(table, token_positions(positions, x.shape[1], query_offset), axis=0)  # [B, L, D]
        return x + pe.astype(x.dtype), None, None


# --- Rotary position embeddings (Su et al.) ---------------------------------------------------------


@register("positions", "rope")
class RoPE(nn.Module):
    """Rotary embeddings: self-attention rotates the first `rotary_dim` dims of q and k by position.

    Pairs (x_i, x_{i + R/2}) are rotated by angle p * theta^(-2i/R) (the half-split layout of
    GPT-NeoX / LLaMA / Gemma), so q.k depends only on the offset between the two positions.
    """

    config: T5Config
    bidirectional: bool
    scope_name: ClassVar[str] = "positions"

    def __call__(self, x, positions, key_length, query_offset=None):
        cfg = self.config
        half = cfg.rotary_dim // 2
        inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float32) / half)  # [R/2]
        angles = token_positions(positions, x.shape[1], query_offset).astype(jnp.float32)[..., None] * inv_freq
        return x, None, (jnp.sin(angles), jnp.cos(angles))  # [B, L, R/2] each


def apply_rotary(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotates pairs (x_i, x_{i+R/2}), i < R/2, of each head by the angles of `rotary`; the rest pass.

    x [B, L, H, Dh]; sin, cos [B, L, R/2]. As complex numbers: (x_i + j x_{i+R/2}) * e^{j angle_i}.
    """
    sin, cos = (t[:, :, None, :] for t in rotary)  # [B, L, 1, R/2]
    half = sin.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
