"""T5 encoder, decoder and the two top-level models, EncoderDecoder and DecoderOnly.

Residual layers whose attention, MLP, norm and position modules are looked up by the names
in the config (t5lite/registry.py): T5 is pre-norm (norm -> sublayer -> dropout -> add),
`norm_layout` also gives post-norm and sandwich. Each stack owns one positions module (T5's
relative-position table, shared by all its layers, or with `relative_attention_per_layer` one
table per layer, UMT5). With `config.scan_layers` the layers are
one `nn.scan` over a stacked parameter tree (leading `layers` axis), which compiles once
instead of once per layer; `t5lite.model.params.scan_params` / `unscan_params` convert. When
the layers differ (an MoE MLP every k-th layer) the scan steps over blocks of k layers.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite import registry
from t5lite.errors import UserError
from t5lite.model.attention import make_attention_mask, make_causal_mask, make_segment_mask, mask_to_bias
from t5lite.model.attention_core import AttentionSpec, resolve_impl
from t5lite.model.config import REMAT_POLICIES, T5Config
from t5lite.model.layers import BATCH_LENGTH_EMBED, DenseGeneral, Embed


def _residual(layer: nn.Module, x: jax.Array, stem: str, sublayer) -> jax.Array:
    """x + sublayer(x) in the config's norm layout, with the norms named like T5X's ('pre_<stem>_layer_norm').

    pre: x + f(norm(x)) (T5); post: norm(x + f(x)) (Vaswani et al.); sandwich: x + norm(f(norm(x))).
    """
    cfg: T5Config = layer.config
    norm = registry.get("norm", cfg.norm)
    h = norm(cfg, name=f"pre_{stem}_layer_norm")(x) if cfg.norm_layout != "post" else x
    h = sublayer(h)
    if cfg.norm_layout == "sandwich":
        h = norm(cfg, name=f"post_{stem}_layer_norm")(h)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=layer.deterministic)
    return norm(cfg, name=f"post_{stem}_layer_norm")(x) if cfg.norm_layout == "post" else x


def _layer_relative_bias(cfg: T5Config, bidirectional: bool, q_len: int, key_length: int,
                         query_offset: Optional[jax.Array]) -> jax.Array:
    """UMT5: the calling layer's own relative-bias table ('relpos_bias' under the layer), as [1, H, q, k]."""
    table = registry.get("positions", "t5_relative_bias")(cfg, bidirectional, name="relpos_bias")
    _, bias, _ = table(jnp.zeros((1, q_len, 1)), None, key_length, query_offset)
    return bias


def _layer_bias(bias, kind: str):
    """A stack with sliding-window layers passes {'global': bias, 'local': windowed bias}; a layer takes its own."""
    return bias[kind] if isinstance(bias, dict) else bias


class EncoderLayer(nn.Module):
    """Self-attention then MLP, each a residual block (`_residual`)."""

    config: T5Config
    deterministic: bool
    mlp_name: str = "dense"  # the registered MLP of this layer (see T5Config.mlp_of_layer)
    attention_kind: str = "global"  # 'local': sliding-window self-attention (see T5Config.attention_of_layer)
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, rotary: Optional[Tuple[jax.Array, jax.Array]]):
        cfg = self.config
        bias = _layer_bias(bias, self.attention_kind)
        if cfg.relative_attention_per_layer:
            bias = bias + _layer_relative_bias(cfg, True, x.shape[1], bias.shape[-1], None)  # [B, H, L, L]
        attention = registry.get("attention", cfg.encoder_attention or cfg.attention)(cfg, name="attention")
        x = _residual(self, x, "attention", lambda h: attention(h, h, bias, self.deterministic, rotary))
        mlp = registry.get("mlp", self.mlp_name)(cfg, name="mlp")
        x = nn.with_logical_constraint(_residual(self, x, "mlp", lambda h: mlp(h, self.deterministic)),
                                       BATCH_LENGTH_EMBED)  # [B, L, D]
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder (unless decoder-only), then MLP."""

    config: T5Config
    deterministic: bool
    mlp_name: str = "dense"
    decoder_only: bool = False
    decode: bool = False  # read/write the key-value cache (see MultiHeadAttention)
    cache_length: Optional[int] = None
    attention_kind: str = "global"
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, self_bias: jax.Array, rotary: Optional[Tuple[jax.Array, jax.Array]],
                 encoded: Optional[jax.Array], cross_bias: Optional[jax.Array],
                 decode_position: Optional[jax.Array] = None):
        cfg = self.config
        self_bias = _layer_bias(self_bias, self.attention_kind)
        if cfg.relative_attention_per_layer:  # queries from decode_position on when stepping a cache
            self_bias = self_bias + _layer_relative_bias(cfg, False, x.shape[1], self_bias.shape[-1], decode_position)
        attention_cls = registry.get("attention", cfg.attention)
        # A local layer's decoding cache holds its window only (a ring of slots; see MultiHeadAttention).
        ring = _ring_slots(cfg, self.cache_length) if self.decode and self.attention_kind == "local" else None
        attention = lambda name, is_cross: attention_cls(  # noqa: E731
            cfg, is_cross=is_cross, decode=self.decode, cache_length=self.cache_length, name=name,
            **({"cache_window": ring} if ring and not is_cross else {}))
        self_attention = attention("self_attention", False)
        x = _residual(self, x, "self_attention",
                      lambda h: self_attention(h, h, self_bias, self.deterministic, rotary, decode_position))
        if not self.decoder_only:
            cross_attention = attention("encoder_decoder_attention", True)
            x = _residual(self, x, "cross_attention",
                          lambda h: cross_attention(h, encoded, cross_bias, self.deterministic))
        mlp = registry.get("mlp", self.mlp_name)(cfg, name="mlp")
        x = nn.with_logical_constraint(_residual(self, x, "mlp", lambda h: mlp(h, self.deterministic)),
                                       BATCH_LENGTH_EMBED)  # [B, L, D]
        return (x, None) if self.scanned else x


class _LayerBlock(nn.Module):
    """`size` consecutive layers as one scan step (layer_0 .. layer_{size-1}), for stacks whose
    layers repeat with a period (an MoE MLP every `moe_every`-th layer, a sliding-window pattern)."""

    layer_cls: Any
    size: int
    layer_kwargs: Tuple[Tuple[str, Any], ...]  # what each layer is built with (config, deterministic, ...)

    @nn.compact
    def __call__(self, x: jax.Array, *args):
        kwargs = dict(self.layer_kwargs)
        for j in range(self.size):
            cfg = kwargs["config"]
            x = self.layer_cls(**kwargs, mlp_name=cfg.mlp_of_layer(j), attention_kind=cfg.attention_of_layer(j),
                               name=f"layer_{j}")(x, *args)
        return x, None


def _run_layers(parent: nn.Module, layer_cls, num_layers: int, x: jax.Array, *args, **layer_kwargs):
    """Applies `num_layers` layers, unrolled as layers_0..N-1 or scanned as one stacked `layers`."""
    cfg: T5Config = layer_kwargs["config"]
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        for i in range(num_layers):
            x = layer_cls(**layer_kwargs, mlp_name=cfg.mlp_of_layer(i), attention_kind=cfg.attention_of_layer(i),
                          name=f"layers_{i}", parent=parent)(x, *args)
        return x
    block = cfg.layers_per_scan_block
    if block == 1:
        step, step_kwargs = layer_cls, dict(layer_kwargs, mlp_name=cfg.mlp_of_layer(0),
                                            attention_kind=cfg.attention_of_layer(0), scanned=True)
    else:
        step, step_kwargs = _LayerBlock, dict(layer_cls=layer_cls, size=block,
                                              layer_kwargs=tuple(sorted(layer_kwargs.items())))
    scanned = nn.scan(
        step,
        variable_axes={"params": 0, "cache": 0, "aux_loss": 0, "lora": 0},  # lora: adapter cards (model/lora.py)
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers // block,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(**step_kwargs, name="layers", parent=parent)(x, *args)
    return x


def _positions(cfg: T5Config, bidirectional: bool) -> nn.Module:
    """The stack's positions module, named by its class (e.g. 'relpos_bias', T5X's name); none when
    each layer owns its relative bias (UMT5)."""
    cls = registry.get("positions", "none" if cfg.relative_attention_per_layer else cfg.position_scheme)
    return cls(cfg, bidirectional, name=cls.scope_name)


def _attention_impl(cfg: T5Config, max_length: int, deterministic: bool) -> str:
    """What attention_core implementation a stack's attention runs as, for its longest sequence."""
    has_bias = getattr(registry.get("positions", cfg.position_scheme), "block_bias", None) is not None
    return resolve_impl(cfg.attention_impl, max_length, cfg.attention_auto_min_length,
                        dropout=cfg.dropout_rate > 0 and not deterministic, has_bias=has_bias, dtype=cfg.dtype,
                        softcap=cfg.attention_logit_softcap)


def _per_block_positions(cfg: T5Config, bidirectional: bool, x, positions, length):
    """The positions module's output for a non-dense attention core: x, the bias as AttentionSpec fields, rotary."""
    module = _positions(cfg, bidirectional)
    if getattr(module, "block_bias", None) is not None:
        return module(x, positions, length, per_block=True)
    x, bias, rotary = module(x, positions, length)
    if bias is not None:
        raise UserError(f"position_scheme {cfg.position_scheme!r} makes a [q, k] bias array that attention_impl="
                        f"{cfg.attention_impl!r} cannot compute per block; set T5Config.attention_impl='dense'")
    return x, {}, rotary


def _spec(cfg: T5Config, impl: str, **fields) -> AttentionSpec:
    return AttentionSpec(**fields, num_heads=cfg.num_heads, softcap=cfg.attention_logit_softcap, impl=impl,
                         block_q=cfg.attention_block_q, block_k=cfg.attention_block_k)


def _has_local_layers(cfg: T5Config) -> bool:
    return cfg.sliding_window is not None and "local" in cfg.sliding_window_pattern


def _window_mask(cfg: T5Config, q_pos: jax.Array, k_pos: jax.Array, causal: bool) -> jax.Array:
    """[1, 1, q, k] True where key k_pos is inside query q_pos's window: HF's masks, 0 <= q - k < w (causal;
    the causal mask supplies q - k >= 0) or |q - k| <= w (bidirectional)."""
    delta = q_pos[:, None] - k_pos[None, :]
    near = delta < cfg.sliding_window if causal else jnp.abs(delta) <= cfg.sliding_window
    return near[None, None]


def _ring_slots(cfg: T5Config, cache_length: Optional[int]) -> Optional[int]:
    """Cache slots of a local layer's self-attention when decoding: the window when it is shorter than the cache
    and no position bias spans the whole cache (T5's, ALiBi's); None: a full-length cache, masked."""
    if not _has_local_layers(cfg) or not cache_length or cfg.sliding_window >= cache_length:
        return None
    has_bias = getattr(registry.get("positions", cfg.position_scheme), "block_bias", None) is not None
    return None if has_bias or cfg.relative_attention_per_layer else cfg.sliding_window


def _ring_bias(cfg: T5Config, slots: int, q_pos, decode_position, length: int, prefix, key_valid) -> jax.Array:
    """[B or 1, 1, q, slots + q] bias of a ring cache's step: its keys are the slots (slot s holds the latest
    position before decode_position that is s mod slots; negative: never written), then the new tokens."""
    old = decode_position - 1 - jnp.mod(decode_position - 1 - jnp.arange(slots), slots)  # [slots]
    k_pos = jnp.concatenate([old, q_pos])  # [slots + q]
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if prefix is not None:  # prefix flags cover the cache positions: [B, Lmax]
        q_prefix = jax.lax.dynamic_slice_in_dim(prefix, decode_position, length, axis=1)
        mask = jnp.logical_or(mask, make_attention_mask(q_prefix, jnp.take(prefix, jnp.maximum(k_pos, 0), axis=1)))
    near = (k_pos[None, :] >= 0) & (q_pos[:, None] - k_pos[None, :] < cfg.sliding_window)
    mask = jnp.logical_and(mask, near[None, None])
    if key_valid is not None:
        mask = jnp.logical_and(mask, jnp.take(key_valid, jnp.maximum(k_pos, 0), axis=1)[:, None, None, :].astype(bool))
    return mask_to_bias(mask)


def _dense_bias(cfg: T5Config, mask: jax.Array, position_bias, window_mask=None):
    """mask [B, 1, q, k] (+ position bias) -> the float32 bias, or with sliding-window layers
    {'global': bias, 'local': bias of mask AND window_mask}."""
    def bias_of(m):
        return mask_to_bias(m) if position_bias is None else mask_to_bias(m) + position_bias

    if not _has_local_layers(cfg):
        return bias_of(mask)
    return {"global": bias_of(mask), "local": bias_of(jnp.logical_and(mask, window_mask))}


def _local_spec(cfg: T5Config, spec: AttentionSpec, causal: bool):
    """The AttentionSpec of sliding-window layers next to the global one; the spec's window is |q - k| < w
    bidirectional, so HF's inclusive |q - k| <= w is w + 1 there."""
    if not _has_local_layers(cfg):
        return spec
    return {"global": spec, "local": spec.replace(window=cfg.sliding_window + (0 if causal else 1))}


def _embed(cfg: T5Config, embedder: Embed, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, L, D], times sqrt(emb_dim) in the compute dtype with embedding_scale (Gemma)."""
    x = embedder(tokens)
    return x * jnp.asarray(cfg.emb_dim ** 0.5, x.dtype) if cfg.embedding_scale else x


def _embedder(cfg: T5Config) -> Embed:
    """A token table. With `embedding_scale` (Gemma: inputs * sqrt(d), tied logits unscaled) its initial rows have
    std d^-1/2, so the scaled inputs and the logits start near unit variance (std 1, T5's, starts the logits at
    std sqrt(d): a from-scratch loss near 30 at d = 256 instead of ln(vocab)). Converted weights are unaffected."""
    std = cfg.emb_dim ** -0.5 if cfg.embedding_scale else 1.0
    return Embed(cfg.vocab_size, cfg.emb_dim, jnp.dtype(cfg.dtype), embedding_init=nn.initializers.normal(stddev=std))


def _final_norm(cfg: T5Config, name: str, x: jax.Array) -> jax.Array:
    """The stack's last norm; post-norm layers already end normalised, so they have none."""
    return x if cfg.norm_layout == "post" else registry.get("norm", cfg.norm)(cfg, name=name)(x)


class Encoder(nn.Module):
    """Embeds tokens and runs the bidirectional encoder stack; returns [B, L, D]."""

    config: T5Config
    token_embedder: Embed

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None,
                 deterministic: bool = True, positions: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        length = tokens.shape[-1]
        x = _embed(cfg, self.token_embedder, tokens)
        attention_cls = registry.get("attention", cfg.encoder_attention or cfg.attention)
        impl = _attention_impl(cfg, length, deterministic)
        if cfg.attention_impl == "auto" and getattr(attention_cls, "dense_only", False):
            impl = "dense"
        if impl != "dense":  # masks and position bias computed per block by the attention core
            x, position_fields, rotary = _per_block_positions(cfg, True, x, positions, length)
            bias = _local_spec(cfg, _spec(cfg, impl, q_valid=tokens > 0, k_valid=tokens > 0, q_segments=segment_ids,
                                          k_segments=segment_ids, **position_fields), causal=False)
        else:
            mask = make_attention_mask(tokens > 0, tokens > 0)  # [B, 1, L, L]
            if segment_ids is not None:
                mask = jnp.logical_and(mask, make_segment_mask(segment_ids, segment_ids))
            x, position_bias, rotary = _positions(cfg, bidirectional=True)(x, positions, length)
            rows = jnp.arange(length)
            window = _window_mask(cfg, rows, rows, causal=False) if _has_local_layers(cfg) else None
            bias = _dense_bias(cfg, mask, position_bias, window)  # [B, H, L, L] (or a dict of two)
        if hasattr(attention_cls, "encoder_bias"):  # e.g. LongT5's local / transient-global (model/longt5.py)
            bias = attention_cls.encoder_bias(self, bias, tokens, segment_ids)

        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _run_layers(self, EncoderLayer, cfg.num_encoder_layers, x, bias, rotary,
                        config=cfg, deterministic=deterministic)
        x = _final_norm(cfg, "encoder_norm", x)
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
                 decoder_key_valid: Optional[jax.Array] = None,
                 decoder_positions: Optional[jax.Array] = None, return_hidden: bool = False,
                 hidden: Optional[jax.Array] = None) -> jax.Array:
        """Logits [B, T, V]; with `return_hidden` the final hidden states [B, T, D] instead; given `hidden`
        only the output layer runs on it (a loss can then make the logits a chunk of tokens at a time)."""
        if hidden is not None:
            return self.logits(hidden)
        cfg = self.config
        length = decoder_input_tokens.shape[-1]
        prefix = decoder_causal_attention if cfg.decoder_only_prefix_lm else None
        stepping = decode and decode_position is not None
        # Without targets every decoder position counts as real (token 0 is also the start token).
        valid = decoder_target_tokens > 0 if decoder_target_tokens is not None and not stepping else None
        longest = max(length, 0 if encoder_input_tokens is None else encoder_input_tokens.shape[-1])
        impl = "dense" if stepping else _attention_impl(cfg, longest, deterministic)  # decoding steps: the cache
        tokens = decoder_input_tokens
        if cfg.decoder_start_token_id and not self.decoder_only:  # 0 in decoder inputs is the start (or padding)
            tokens = jnp.where(tokens == 0, cfg.decoder_start_token_id, tokens)
        x = _embed(cfg, self.token_embedder, tokens)
        if impl != "dense":
            x, position_fields, rotary = _per_block_positions(cfg, False, x, decoder_positions, length)
            self_bias = _local_spec(cfg, _spec(cfg, impl, q_valid=valid, k_valid=valid, q_segments=decoder_segment_ids,
                                               k_segments=decoder_segment_ids, q_prefix=prefix, k_prefix=prefix,
                                               causal=True, **position_fields), causal=True)
            cross_bias = None
            if not self.decoder_only:
                both = decoder_segment_ids is not None and encoder_segment_ids is not None
                cross_bias = _spec(cfg, impl, q_valid=valid, k_valid=encoder_input_tokens > 0,
                                   q_segments=decoder_segment_ids if both else None,
                                   k_segments=encoder_segment_ids if both else None)
        else:
            x, self_bias, cross_bias, rotary = self._dense_biases(
                x, stepping, length, valid, prefix, decode_position, max_decode_length, decoder_key_valid,
                decoder_segment_ids, encoder_segment_ids, encoder_input_tokens, decoder_input_tokens,
                decoder_positions)

        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _run_layers(self, DecoderLayer, cfg.num_decoder_layers, x, self_bias, rotary, encoded, cross_bias,
                        decode_position, config=cfg, deterministic=deterministic,
                        decoder_only=self.decoder_only, decode=decode, cache_length=max_decode_length)
        x = _final_norm(cfg, "decoder_norm", x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return x if return_hidden else self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final hidden states [..., D] -> float32 logits [..., V]."""
        cfg = self.config
        if cfg.logits_via_embedding:
            # Tied embeddings: T5 v1.0 rescales so the logits keep unit-ish variance; Gemma does not.
            logits = self.token_embedder.attend(x * (cfg.emb_dim ** -0.5) if cfg.scale_tied_logits else x)
        else:
            logits = DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32, name="logits_dense")(x)
        logits = jnp.asarray(logits, jnp.float32)
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def _dense_biases(self, x, stepping, length, valid, prefix, decode_position, max_decode_length,
                      decoder_key_valid, decoder_segment_ids, encoder_segment_ids, encoder_input_tokens,
                      decoder_input_tokens, decoder_positions):
        """The dense path's [B, H, T, T or Lmax] self-attention and [B, 1, T, L] cross-attention biases."""
        cfg = self.config
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
            key_length, query_offset = max_decode_length, decode_position
            window_mask = _window_mask(cfg, q_pos, k_pos, causal=True) if _has_local_layers(cfg) else None
        else:
            self_mask = make_causal_mask(length, prefix)  # [1 or B, 1, T, T]
            if valid is not None:
                self_mask = jnp.logical_and(self_mask, make_attention_mask(valid, valid))
            if decoder_segment_ids is not None:
                self_mask = jnp.logical_and(self_mask, make_segment_mask(decoder_segment_ids, decoder_segment_ids))
            key_length, query_offset = length, None
            rows = jnp.arange(length)
            window_mask = _window_mask(cfg, rows, rows, causal=True) if _has_local_layers(cfg) else None
        x, position_bias, rotary = _positions(cfg, bidirectional=False)(x, decoder_positions, key_length, query_offset)
        self_bias = _dense_bias(cfg, self_mask, position_bias, window_mask)  # [B, H, T, T or Lmax] (or a dict of two)
        ring = _ring_slots(cfg, max_decode_length) if stepping else None
        if ring:
            self_bias["local"] = _ring_bias(cfg, ring, q_pos, decode_position, length, prefix, decoder_key_valid)

        cross_bias = None
        if not self.decoder_only:
            query_valid = valid if valid is not None else jnp.ones_like(decoder_input_tokens, bool)
            cross_mask = make_attention_mask(query_valid, encoder_input_tokens > 0)  # [B, 1, T, L]
            if decoder_segment_ids is not None and encoder_segment_ids is not None:
                cross_mask = jnp.logical_and(cross_mask, make_segment_mask(decoder_segment_ids, encoder_segment_ids))
            cross_bias = mask_to_bias(cross_mask)
        return x, self_bias, cross_bias, rotary


class EncoderDecoder(nn.Module):
    """T5: `__call__` takes T5X feature names and returns float32 logits [B, T, vocab]."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = _embedder(cfg)
        # T5Gemma: the encoder has its own table; token_embedder is the decoder's (and the tied output layer).
        if cfg.separate_embeddings:
            self.encoder_embedder = _embedder(cfg)
        self.encoder = Encoder(cfg, self.encoder_embedder if cfg.separate_embeddings else self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=False, encoder_positions=None):
        """[B, L] int32 -> encoded [B, L, D]."""
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=not enable_dropout,
                            positions=encoder_positions)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, enable_dropout=False, decode=False,
               decode_position=None, max_decode_length=None, decoder_positions=None, return_hidden=False):
        """Decoder pass over `encoded` -> logits [B, T, V]; teacher-forced, or on a cache with `decode`."""
        return self.decoder(decoder_input_tokens, encoded, encoder_input_tokens, decoder_target_tokens,
                            encoder_segment_ids, decoder_segment_ids, deterministic=not enable_dropout,
                            decode=decode, decode_position=decode_position, max_decode_length=max_decode_length,
                            decoder_positions=decoder_positions, return_hidden=return_hidden)

    def logits_from_hidden(self, hidden):
        """The output layer alone: final hidden states [..., D] (from return_hidden=True) -> logits [..., V]."""
        return self.decoder(None, hidden=hidden)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, enable_dropout=False, return_hidden=False, **unused_features):
        """`*_positions` [B, L]: each token's position in its segment (packed rows restart at 0);
        absent, positions are 0..L-1. Relative schemes only use offsets inside a segment.
        `return_hidden`: the decoder's final hidden states [B, T, D] instead of the logits."""
        del unused_features
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout, encoder_positions)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, enable_dropout,
                           decoder_positions=decoder_positions, return_hidden=return_hidden)


class DecoderOnly(nn.Module):
    """A decoder stack without cross-attention: causal LM, or prefix LM with `decoder_only_prefix_lm`."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = _embedder(cfg)
        self.decoder = Decoder(cfg, self.token_embedder, decoder_only=True)

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
                 decoder_positions=None, decoder_causal_attention=None, enable_dropout=False, decode=False,
                 decode_position=None, max_decode_length=None, decoder_key_valid=None, return_hidden=False,
                 **unused_features):
        """`decoder_causal_attention` [B, T] marks the prefix (1) that attends bidirectionally.

        When decoding on a cache it covers all cache positions [B, max_decode_length], and
        `decoder_key_valid` [B, max_decode_length] masks cache slots that hold no token (padding);
        `decoder_positions` then gives the positions of the tokens fed (default decode_position..).
        """
        del unused_features
        return self.decoder(decoder_input_tokens, decoder_target_tokens=decoder_target_tokens,
                            decoder_segment_ids=decoder_segment_ids,
                            decoder_causal_attention=decoder_causal_attention,
                            deterministic=not enable_dropout, decode=decode, decode_position=decode_position,
                            max_decode_length=max_decode_length, decoder_key_valid=decoder_key_valid,
                            decoder_positions=decoder_positions, return_hidden=return_hidden)

    def logits_from_hidden(self, hidden):
        """The output layer alone: final hidden states [..., D] -> logits [..., V]."""
        return self.decoder(None, hidden=hidden)
