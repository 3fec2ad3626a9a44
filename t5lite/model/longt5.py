"""LongT5's encoder self-attentions (Guo et al., 2022): local and transient-global.

Chosen by `T5Config.encoder_attention`; the decoder stays T5's. Each class keeps MultiHeadAttention's
projections (so parameter paths and the HF mapping are T5's) and adds a class hook, `encoder_bias`,
that the Encoder calls once per stack to turn its usual bias (mask + T5 relative bias, or the
AttentionSpec of the other cores) into this attention's; `dense_only` keeps attention_impl='auto' dense.

longt5_local: every query sees the keys within `local_radius` tokens of it, |i - j| <= r, under the
stack's T5 relative bias. HF computes this in blocks of r + 1 queries against 3 blocks of keys with the
mask |i - j| < r + 1: the same pairs and the same bias. Dense: a band mask; blockwise / fused:
AttentionSpec.window = r + 1.

longt5_transient_global: local attention plus, for every query, one "global token" per
`global_block_size`-token block of its row: the sum of the block's (layer-normed) inputs, normalised
again by the layer's own `global_input_layer_norm`, projected by the same key / value weights, under a
second relative-bias table over block offsets (global block - the query's block), shared by the stack
like T5's. Tokens of an incomplete last block join the block before it; a row with fewer tokens than
one block has no global tokens. Packed rows: every segment has its own blocks and global tokens, as if
it were alone in its row. Dense path only (its keys are the row plus the globals).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite import registry
from t5lite.errors import UserError
from t5lite.model.attention import MultiHeadAttention
from t5lite.model.attention_core import MASK_VALUE, AttentionSpec
from t5lite.model.positions import relative_position_bucket
from t5lite.registry import register

__all__ = ["LocalAttention", "TransientGlobalAttention", "TransientGlobalBias", "global_blocks"]


def _band(cfg, length: int) -> jax.Array:
    """[1, 1, L, L] float32: 0 where |i - j| <= local_radius, MASK_VALUE elsewhere."""
    idx = np.arange(length)
    near = np.abs(idx[:, None] - idx[None, :]) <= cfg.local_radius
    return jnp.asarray(np.where(near, 0.0, MASK_VALUE).astype(np.float32))[None, None]


@register("attention", "longt5_local")
class LocalAttention(MultiHeadAttention):
    """T5 attention restricted to |query - key| <= local_radius (LongT5 local)."""

    @classmethod
    def encoder_bias(cls, stack: nn.Module, bias, tokens: jax.Array, segment_ids):
        """The stack's [B, H, L, L] bias (or AttentionSpec) -> the same restricted to the band."""
        cfg = stack.config
        if isinstance(bias, AttentionSpec):
            return bias.replace(window=cfg.local_radius + 1)  # |i - j| < r + 1
        return bias + _band(cfg, tokens.shape[1])  # [B, H, L, L]


@flax.struct.dataclass
class TransientGlobalBias:
    """What transient-global attention needs from its stack, computed once for all layers."""

    local: jax.Array  # [B or 1, H, L, L] float32: mask, band and T5 bias of the local keys
    side: jax.Array  # [B, H, L, G] float32: mask and global relative bias of the G global tokens
    block_ids: jax.Array  # [B, L] int32: the global token each token is summed into, -1 for none


def global_blocks(valid: jax.Array, segment_ids, block_size: int):
    """Each token's global block. [B, L] bool (and segment ids, packed rows) -> (slot [B, L]: the global token
    the token is summed into, -1 for none; first [B, L]: its segment's first slot; count [B, L]: its segment's
    number of slots; block [B, L]: its block within its segment, -1 if the segment has none).

    Each segment (the whole row when unpacked, as in HF) has one global token per complete block of
    block_size tokens; tokens of an incomplete last block join the block before. Slots are numbered across
    the row, segment after segment: they add up to at most G = L // block_size.
    """
    length = valid.shape[1]
    idx = jnp.arange(length)
    seg = valid.astype(jnp.int32) if segment_ids is None else jnp.where(valid, segment_ids, 0)
    same = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B, L, L]
    segment_length = same.sum(-1)  # [B, L]: of each token's segment
    start = jnp.argmax(same, axis=-1)  # [B, L]: the segment's first token
    count = segment_length // block_size
    is_start = valid & (start == idx)
    before = jnp.cumsum(jnp.where(is_start, count, 0), axis=-1) - jnp.where(is_start, count, 0)  # exclusive
    first = jnp.take_along_axis(before, start, axis=-1)
    block = jnp.minimum((idx - start) // block_size, count - 1)
    slot = jnp.where(valid & (count > 0), first + block, -1)
    return slot.astype(jnp.int32), first, count, block


@register("attention", "longt5_transient_global")
class TransientGlobalAttention(MultiHeadAttention):
    """LongT5 transient-global: local attention plus per-block aggregated global tokens (see the module doc)."""

    dense_only = True  # attention_impl='auto' keeps the encoder dense

    @classmethod
    def encoder_bias(cls, stack: nn.Module, bias, tokens: jax.Array, segment_ids):
        cfg = stack.config
        if isinstance(bias, AttentionSpec):
            raise UserError(f"encoder_attention='longt5_transient_global' runs in the dense path only; set "
                            f"T5Config.attention_impl='dense' (or 'auto'), not {cfg.attention_impl!r}")
        valid = tokens > 0  # [B, L]
        num_globals = tokens.shape[1] // cfg.global_block_size
        slot, first, count, block = global_blocks(valid, segment_ids, cfg.global_block_size)
        position_cls = registry.get("positions", "t5_relative_bias")
        _, fields, _ = position_cls(cfg, True, name="global_relpos_bias", parent=stack)(
            tokens[..., None], None, tokens.shape[1], per_block=True)
        # Offset of each global token from the query's block, both counted within the query's segment.
        side_offsets = jnp.arange(num_globals)[None, None] - (first + block)[..., None]  # [B, L, G], in [-G, G]
        offsets = np.arange(-num_globals, num_globals + 1)
        buckets = jnp.asarray(relative_position_bucket(offsets, True, cfg.relative_attention_num_buckets,
                                                       cfg.relative_attention_max_distance).astype(np.int32))
        side = jnp.take(fields["table"], buckets[jnp.clip(side_offsets, -num_globals, num_globals) + num_globals],
                        axis=1)  # [H, B, L, G]
        k = jnp.arange(num_globals)[None, None]
        side_mask = valid[..., None] & (k >= first[..., None]) & (k < (first + count)[..., None])  # [B, L, G]
        side = jnp.moveaxis(side, 0, 1) + jnp.where(side_mask, 0.0, MASK_VALUE)[:, None]  # [B, H, L, G]
        return TransientGlobalBias(local=bias + _band(cfg, tokens.shape[1]), side=side, block_ids=slot)

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, bias, deterministic, rotary=None, decode_position=None):
        if not isinstance(bias, TransientGlobalBias) or self.is_cross or self.decode:
            raise UserError("attention 'longt5_transient_global' is an encoder self-attention; set it as "
                            "T5Config.encoder_attention, not T5Config.attention")
        cfg = self.config
        num_globals = bias.side.shape[-1]
        one_hot = (bias.block_ids[..., None] == jnp.arange(num_globals)).astype(inputs_q.dtype)  # [B, L, G]
        aggregated = jnp.einsum("bld,blg->bgd", inputs_q, one_hot)  # [B, G, D]: each block's sum
        aggregated = registry.get("norm", cfg.norm)(cfg, name="global_input_layer_norm")(aggregated)
        keys = jnp.concatenate([inputs_kv, aggregated.astype(inputs_kv.dtype)], axis=1)  # [B, L + G, D]
        local = jnp.broadcast_to(bias.local, bias.side.shape[:2] + bias.local.shape[2:])  # [B, H, L, L]
        full = jnp.concatenate([local, bias.side], axis=-1)  # [B, H, L, L + G]
        return super().__call__(inputs_q, keys, full, deterministic, rotary, decode_position)
