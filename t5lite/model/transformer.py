"""T5 encoder, decoder and the two top-level models, EncoderDecoder and DecoderOnly.

Pre-norm residual layers (RMSNorm -> sublayer -> dropout -> add). Each stack owns one
relative-position table shared by all its layers. With `config.scan_layers` the layers are
one `nn.scan` over a stacked parameter tree (leading `layers` axis), which compiles once
instead of once per layer; `t5lite.model.params.scan_params` / `unscan_params` convert.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.model.attention import (MultiHeadAttention, RelativePositionBias, make_attention_mask,
                                    make_causal_mask, make_segment_mask, mask_to_bias)
from t5lite.model.config import T5Config
from t5lite.model.layers import BATCH_LENGTH_EMBED, DenseGeneral, Embed, MlpBlock, RMSNorm

_REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class EncoderLayer(nn.Module):
    """Self-attention then MLP, each pre-normed with a residual connection."""

    config: T5Config
    deterministic: bool
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # noqa: E731
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dtype, name="attention")(
            h, h, bias, self.deterministic)
        x = x + dropout(h)
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(h, self.deterministic)
        x = nn.with_logical_constraint(x + dropout(h), BATCH_LENGTH_EMBED)  # [B, L, D]
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder (unless decoder-only), then MLP."""

    config: T5Config
    deterministic: bool
    decoder_only: bool = False
    decode: bool = False  # read/write the key-value cache (see MultiHeadAttention)
    cache_length: Optional[int] = None
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, self_bias: jax.Array, encoded: Optional[jax.Array],
                 cross_bias: Optional[jax.Array], decode_position: Optional[jax.Array] = None):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # noqa: E731
        attention = lambda name, is_cross: MultiHeadAttention(  # noqa: E731
            cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dtype, is_cross=is_cross, decode=self.decode,
            cache_length=self.cache_length, name=name)
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
        x = x + dropout(attention("self_attention", False)(h, h, self_bias, self.deterministic, decode_position))
        if not self.decoder_only:
            h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
            x = x + dropout(attention("encoder_decoder_attention", True)(h, encoded, cross_bias, self.deterministic))
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(h, self.deterministic)
        x = nn.with_logical_constraint(x + dropout(h), BATCH_LENGTH_EMBED)  # [B, L, D]
        return (x, None) if self.scanned else x


def _run_layers(parent: nn.Module, layer_cls, num_layers: int, x: jax.Array, *args, **layer_kwargs):
    """Applies `num_layers` layers, unrolled as layers_0..N-1 or scanned as one stacked `layers`."""
    cfg: T5Config = layer_kwargs["config"]
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        for i in range(num_layers):
            x = layer_cls(**layer_kwargs, name=f"layers_{i}", parent=parent)(x, *args)
        return x
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(**layer_kwargs, scanned=True, name="layers", parent=parent)(x, *args)
    return x


class Encoder(nn.Module):
    """Embeds tokens and runs the bidirectional encoder stack; returns [B, L, D]."""

    config: T5Config
    token_embedder: Embed

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        length = tokens.shape[-1]
        mask = make_attention_mask(tokens > 0, tokens > 0)  # [B, 1, L, L]
        if segment_ids is not None:
            mask = jnp.logical_and(mask, make_segment_mask(segment_ids, segment_ids))
        relpos = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                      cfg.num_heads, bidirectional=True, name="relpos_bias")(length, length)
        bias = mask_to_bias(mask) + relpos  # [B, H, L, L]

        x = self.token_embedder(tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _run_layers(self, EncoderLayer, cfg.num_encoder_layers, x, bias,
                        config=cfg, deterministic=deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="encoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """Runs the decoder stack over shifted targets and projects to float32 logits [B, T, V].

    Decoding on a cache: a first call with `decode=True`, `max_decode_length` and no
    `decode_position` allocates the cache (and projects the encoder output for cross-attention);
    later calls pass the tokens at positions decode_position.. (one per step, or a prompt).
    """

    config: T5Config
    token_embedder: Embed
    decoder_only: bool = False

    @nn.compact
    def __call__(self, decoder_input_tokens: jax.Array, encoded: Optional[jax.Array] = None,
                 encoder_input_tokens: Optional[jax.Array] = None,
                 decoder_target_tokens: Optional[jax.Array] = None,
                 encoder_segment_ids: Optional[jax.Array] = None,
                 decoder_segment_ids: Optional[jax.Array] = None,
                 decoder_causal_attention: Optional[jax.Array] = None,
                 deterministic: bool = True, decode: bool = False,
                 decode_position: Optional[jax.Array] = None,
                 max_decode_length: Optional[int] = None,
                 decoder_key_valid: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        length = decoder_input_tokens.shape[-1]
        relpos_bias = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                           cfg.num_heads, bidirectional=False, name="relpos_bias")
        prefix = decoder_causal_attention if cfg.decoder_only_prefix_lm else None
        stepping = decode and decode_position is not None
        # Without targets every decoder position counts as real (token 0 is also the start token).
        valid = decoder_target_tokens > 0 if decoder_target_tokens is not None and not stepping else None
        if stepping:
            # Queries at decode_position + [0, length) against the whole cache [0, max_decode_length).
            q_pos = decode_position + jnp.arange(length)
            k_pos = jnp.arange(max_decode_length)
            self_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, Lmax]
            if prefix is not None:  # prefix flags cover the cache positions: [B, Lmax]
                q_prefix = jax.lax.dynamic_slice_in_dim(prefix, decode_position, length, axis=1)
                self_mask = jnp.logical_or(self_mask, make_attention_mask(q_prefix, prefix))
            if decoder_key_valid is not None:  # e.g. left padding of prompts
                self_mask = jnp.logical_and(self_mask, decoder_key_valid[:, None, None, :].astype(bool))
            relpos = relpos_bias(length, max_decode_length, q_offset=decode_position)
        else:
            self_mask = make_causal_mask(length, prefix)  # [1 or B, 1, T, T]
            if valid is not None:
                self_mask = jnp.logical_and(self_mask, make_attention_mask(valid, valid))
            if decoder_segment_ids is not None:
                self_mask = jnp.logical_and(self_mask, make_segment_mask(decoder_segment_ids, decoder_segment_ids))
            relpos = relpos_bias(length, length)
        self_bias = mask_to_bias(self_mask) + relpos  # [B, H, T, T or Lmax]

        cross_bias = None
        if not self.decoder_only:
            query_valid = valid if valid is not None else jnp.ones_like(decoder_input_tokens, bool)
            cross_mask = make_attention_mask(query_valid, encoder_input_tokens > 0)  # [B, 1, T, L]
            if decoder_segment_ids is not None and encoder_segment_ids is not None:
                cross_mask = jnp.logical_and(cross_mask, make_segment_mask(decoder_segment_ids, encoder_segment_ids))
            cross_bias = mask_to_bias(cross_mask)

        x = self.token_embedder(decoder_input_tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _run_layers(self, DecoderLayer, cfg.num_decoder_layers, x, self_bias, encoded, cross_bias,
                        decode_position, config=cfg, deterministic=deterministic,
                        decoder_only=self.decoder_only, decode=decode, cache_length=max_decode_length)
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="decoder_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # Tied embeddings: rescale so the logits keep unit-ish variance (T5 v1.0).
            logits = self.token_embedder.attend(x * (cfg.emb_dim ** -0.5))
        else:
            logits = DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32, name="logits_dense")(x)
        return nn.with_logical_constraint(jnp.asarray(logits, jnp.float32), ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
    """T5: `__call__` takes T5X feature names and returns float32 logits [B, T, vocab]."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, jnp.dtype(cfg.dtype))
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=False):
        """[B, L] int32 -> encoded [B, L, D]."""
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=not enable_dropout)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, enable_dropout=False, decode=False,
               decode_position=None, max_decode_length=None):
        """Decoder pass over `encoded` -> logits [B, T, V]; teacher-forced, or on a cache with `decode`."""
        return self.decoder(decoder_input_tokens, encoded, encoder_input_tokens, decoder_target_tokens,
                            encoder_segment_ids, decoder_segment_ids, deterministic=not enable_dropout,
                            decode=decode, decode_position=decode_position, max_decode_length=max_decode_length)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, enable_dropout=False, **unused_features):
        # Relative attention depends only on offsets within a segment, which equal offsets in the
        # packed row, so the *_positions features are accepted (T5X batches carry them) but not needed.
        del encoder_positions, decoder_positions, unused_features
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, enable_dropout)


class DecoderOnly(nn.Module):
    """A decoder stack without cross-attention: causal LM, or prefix LM with `decoder_only_prefix_lm`."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, jnp.dtype(cfg.dtype))
        self.decoder = Decoder(cfg, self.token_embedder, decoder_only=True)

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
                 decoder_positions=None, decoder_causal_attention=None, enable_dropout=False, decode=False,
                 decode_position=None, max_decode_length=None, decoder_key_valid=None, **unused_features):
        """`decoder_causal_attention` [B, T] marks the prefix (1) that attends bidirectionally.

        When decoding on a cache it covers all cache positions [B, max_decode_length], and
        `decoder_key_valid` [B, max_decode_length] masks cache slots that hold no token (padding).
        """
        del decoder_positions, unused_features
        return self.decoder(decoder_input_tokens, decoder_target_tokens=decoder_target_tokens,
                            decoder_segment_ids=decoder_segment_ids,
                            decoder_causal_attention=decoder_causal_attention,
                            deterministic=not enable_dropout, decode=decode, decode_position=decode_position,
                            max_decode_length=max_decode_length, decoder_key_valid=decoder_key_valid)
