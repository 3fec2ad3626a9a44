"""T5Config: one frozen, hashable dataclass for every architecture knob, plus named presets.

Hashable so it can be a static argument of `jax.jit` and a field of linen modules. Preset
sizes follow the published T5 (v1.0), T5 v1.1 and mT5 checkpoints; the parameter counts of
each are pinned by golden files in tests/golden/.
"""

import dataclasses
import math
from typing import Optional, Tuple

import jax

from t5lite.errors import UserError
from t5lite import registry

# What each name means, in one place: config validation, the layers and the HF converter read these.
ATTENTION_LAYOUTS = ("joined", "split")
REMAT_POLICIES = {  # name -> what a rematerialised layer keeps for the backward pass
    "none": None,  # no remat: every activation is kept
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}
ACTIVATIONS = {
    "relu": jax.nn.relu,
    # T5 v1.1's "gelu" is the tanh approximation (HF calls it gelu_new).
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": lambda x: x,
}
NORM_LAYOUTS = ("pre", "post", "sandwich")
ATTENTION_IMPLS = ("dense", "blockwise", "cudnn", "pallas_tpu", "auto")  # see t5lite/model/attention_core.py


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture and numerics of a T5-style model. Defaults are t5_1_1_small's."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    # ('relu',) is T5 v1.0's plain MLP; ('gelu', 'linear') is v1.1's gated-GELU: act(x W0) * (x W1).
    mlp_activations: Tuple[str, ...] = ("gelu", "linear")
    # True: logits = (x / sqrt(emb_dim)) @ embedding.T (v1.0). False: separate float32 logits layer.
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # True: every layer's self-attention has its own relative-bias table (UMT5); False: one per stack (T5).
    relative_attention_per_layer: bool = False
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan_layers: bool = False
    remat_policy: str = "none"  # one of REMAT_POLICIES
    # How attention kernels are stored (the same model either way): "joined" keeps heads x head_dim as one
    # axis ([embed, heads * head_dim]; out: [heads * head_dim, embed]), so an FSDP shard of a kernel fills
    # TPU (8, 128) memory tiles; "split" ([embed, heads, head_dim]) is the layout of checkpoints saved before
    # this field existed, whose shards ([embed / 64, 32, 64] on 64 chips) are padded to twice their size.
    attention_layout: str = "joined"
    # Decoder-only models: True lets the inputs prefix attend bidirectionally (prefix LM).
    decoder_only_prefix_lm: bool = False

    # --- Ablations. The defaults are T5's architecture; every name below is a registry entry
    # (t5lite/registry.py), so a module of your own is one more valid value.
    # Positions: t5_relative_bias | absolute_learned | sinusoidal | rope | alibi | none.
    position_scheme: str = "t5_relative_bias"
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0  # share of each head's dims that rotate (the rest pass through)
    max_position_embeddings: int = 512  # absolute_learned: table size, the longest sequence
    attention: str = "multi_head"
    num_kv_heads: Optional[int] = None  # None: num_heads (MHA); fewer: grouped-query; 1: multi-query
    qk_norm: bool = False  # RMSNorm on each query / key head, then explicit 1/sqrt(head_dim) scaling
    attention_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    # Scores scaled by query_pre_attn_scalar ** -0.5 (Gemma 2); None: T5's unscaled scores (the query
    # initializer folds 1/sqrt(head_dim) in), or 1/sqrt(head_dim) with qk_norm.
    query_pre_attn_scalar: Optional[float] = None
    # Sliding-window self-attention (Gemma 2 / T5Gemma, as HF's layer_types): layer i is
    # sliding_window_pattern[i % len(pattern)], "local" (a window) or "global" (all keys). A local layer of the
    # encoder attends |q - k| <= sliding_window, of the decoder 0 <= q - k < sliding_window (HF's two masks).
    sliding_window: Optional[int] = None
    sliding_window_pattern: Tuple[str, ...] = ("global",)
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    embedding_scale: bool = False  # token embeddings * sqrt(emb_dim), in the compute dtype (Gemma)
    # True: encoder and decoder have their own token embeddings (T5Gemma); the decoder's is the one that
    # logits_via_embedding ties to the output layer. False: one table for both (T5).
    separate_embeddings: bool = False
    # logits_via_embedding: True scales the hidden states by emb_dim ** -0.5 first (T5 v1.0), False does not (Gemma).
    scale_tied_logits: bool = True
    # The token the decoder starts from. t5lite's batches and decoding always feed 0 (padding) as the start;
    # the encoder-decoder's decoder embeds a 0 as this id instead (T5Gemma starts from <bos> = 2).
    decoder_start_token_id: int = 0
    # How attention is computed (t5lite/model/attention_core.py): dense [B, H, q, k] scores (the default),
    # blockwise (online softmax, memory linear in length), cudnn (GPU), pallas_tpu (TPU), or auto (dense
    # below attention_auto_min_length tokens or with attention dropout; else cudnn / pallas_tpu / blockwise).
    attention_impl: str = "dense"
    attention_block_q: int = 512  # query rows per block (blockwise / pallas_tpu)
    attention_block_k: int = 512  # key rows per block
    attention_auto_min_length: int = 2048
    # The encoder's self-attention, a registered attention name; None: `attention`. LongT5 (t5lite/model/longt5.py):
    # longt5_local sees the keys within local_radius tokens; longt5_transient_global adds one aggregated global
    # token per global_block_size-token block. The decoder always uses `attention`.
    encoder_attention: Optional[str] = None
    local_radius: int = 127
    global_block_size: int = 16
    norm: str = "rms_norm"  # rms_norm | layer_norm
    norm_layout: str = "pre"  # one of NORM_LAYOUTS: pre (T5), post (Vaswani et al.), sandwich (pre + post)
    mlp: str = "dense"  # dense | moe: the MLP of every `moe_every`-th layer (the others are dense)
    moe_every: int = 1
    # Index of the first MoE layer, then every moe_every-th; None: moe_every - 1 (layers k-1, 2k-1, ...).
    # HF's Switch Transformers put theirs at i % k == 1, i.e. moe_first_layer = 1 % k.
    moe_first_layer: Optional[int] = None
    num_experts: int = 8
    experts_per_token: int = 1  # top-k routing; 1 is the Switch Transformer
    expert_capacity_factor: float = 1.25  # training: slots per expert = ceil(factor * k * row_length / experts)
    eval_expert_capacity_factor: Optional[float] = None  # eval / decoding; None: no capacity limit (dropless)
    # A fixed number of slots per expert per row, in training and evaluation alike (HF Switch's
    # `expert_capacity`); set, it replaces both capacity factors.
    expert_capacity: Optional[int] = None
    router_jitter_noise: float = 0.0  # training only: router input * U(1 - eps, 1 + eps) (Switch)
    moe_load_balancing_weight: float = 0.01  # Switch's alpha
    moe_router_z_loss_weight: float = 0.0  # ST-MoE's router z-loss (they use 1e-3)

    def __post_init__(self):
        self._check_types()
        # Lists from JSON/gin become tuples so the config stays hashable.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        object.__setattr__(self, "sliding_window_pattern", tuple(self.sliding_window_pattern))
        for act in self.mlp_activations:
            if act not in ACTIVATIONS:
                raise UserError(f"unknown mlp activation {act!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.attention_layout not in ATTENTION_LAYOUTS:
            raise UserError(f"unknown attention_layout {self.attention_layout!r}; choose from "
                            f"{', '.join(ATTENTION_LAYOUTS)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"unknown remat_policy {self.remat_policy!r}; choose from {', '.join(REMAT_POLICIES)}")
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "relative_attention_num_buckets",
                     "max_position_embeddings", "moe_every", "num_experts", "experts_per_token"):
            if getattr(self, name) <= 0:
                raise UserError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.dropout_rate, (int, float)) or not 0 <= self.dropout_rate < 1:
            # 1 or more drops every activation: gradient norm 0 at every step, trained in silence
            raise UserError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}; T5 uses 0.1 "
                            "for fine-tuning and 0 for pre-training")
        self._check_ablation_fields()

    def _check_types(self):
        """A value of the wrong type (a gin binding like T5Config.num_heads={}) is one line naming the field,
        not a TypeError deep in the checks below. Integers pass for floats; bools only for bools."""
        import typing
        for field in dataclasses.fields(self):
            hint, value = typing.get_type_hints(type(self))[field.name], getattr(self, field.name)
            args = typing.get_args(hint)
            if typing.get_origin(hint) is typing.Union and type(None) in args:
                if value is None:
                    continue
                hint = next(a for a in args if a is not type(None))
            if hint is bool:
                ok = isinstance(value, bool)
            elif hint is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif hint is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            elif hint is str:
                ok = isinstance(value, str)
            else:  # tuples of names (mlp_activations) and the like
                ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value) \
                    if typing.get_origin(hint) in (tuple, typing.Tuple) else True
            if not ok:
                name = getattr(hint, "__name__", str(hint))
                article = "a finite " if hint is float else ("an " if name[0] in "aeiou" else "a ")
                raise UserError(f"T5Config.{field.name} must be {article}{name}"
                                f"{' or None' if type(None) in args else ''}, got {value!r}")

    def _check_ablation_fields(self):
        for kind, name in (("positions", self.position_scheme), ("attention", self.attention), ("mlp", self.mlp),
                           ("norm", self.norm)):
            registry.get(kind, name)  # a one-line error with the valid names
        if self.encoder_attention is not None:
            registry.get("attention", self.encoder_attention)
        if hasattr(registry.get("attention", self.attention), "encoder_bias"):  # e.g. LongT5's: shapes the encoder
            raise UserError(f"attention {self.attention!r} is an encoder self-attention; set T5Config.encoder_attention="
                            f"{self.attention!r} and keep T5Config.attention for the decoder (e.g. 'multi_head')")
        if self.local_radius < 0 or self.global_block_size <= 0:
            raise UserError(f"local_radius={self.local_radius} must be >= 0 and global_block_size="
                            f"{self.global_block_size} positive")
        if self.encoder_attention == "longt5_transient_global" and (
                self.position_scheme != "t5_relative_bias" or self.relative_attention_per_layer):
            raise UserError("encoder_attention='longt5_transient_global' needs position_scheme='t5_relative_bias' "
                            "with one bias table per stack (relative_attention_per_layer=False)")
        if self.norm_layout not in NORM_LAYOUTS:
            raise UserError(f"unknown norm_layout {self.norm_layout!r}; choose from {', '.join(NORM_LAYOUTS)}")
        if self.num_kv_heads is not None and not (0 < self.num_kv_heads <= self.num_heads
                                                  and self.num_heads % self.num_kv_heads == 0):
            raise UserError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                            "(e.g. 1 for multi-query, or None for multi-head attention)")
        if not 0.0 < self.rope_fraction <= 1.0 or self.rotary_dim < 2:
            raise UserError(f"rope_fraction={self.rope_fraction} must be in (0, 1] and rotate at least 2 of the "
                            f"{self.head_dim} head dims")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(f"unknown attention_impl {self.attention_impl!r}; choose from {', '.join(ATTENTION_IMPLS)}")
        if self.attention_impl in ("blockwise", "cudnn", "pallas_tpu") and self.dropout_rate > 0:
            raise UserError(f"attention_impl={self.attention_impl!r} has no attention-probability dropout; set "
                            "dropout_rate=0, or attention_impl='auto' (dense while dropout is on)")
        for name in ("attention_block_q", "attention_block_k", "attention_auto_min_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.attention_logit_softcap is not None and self.attention_logit_softcap <= 0:
            raise UserError(f"attention_logit_softcap must be positive or None, got {self.attention_logit_softcap}")
        for name in ("final_logit_softcap", "query_pre_attn_scalar", "sliding_window"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"T5Config.{name} must be positive or None, got {getattr(self, name)}")
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise UserError(f"decoder_start_token_id={self.decoder_start_token_id} must be in [0, vocab_size="
                            f"{self.vocab_size})")
        kinds = set(self.sliding_window_pattern)
        if not self.sliding_window_pattern or not kinds <= {"local", "global"}:
            raise UserError(f"sliding_window_pattern={self.sliding_window_pattern} must be a non-empty list of "
                            "'local' / 'global' entries, e.g. ['local', 'global']")
        if "local" in kinds and self.sliding_window is None:
            raise UserError("sliding_window_pattern has 'local' layers but sliding_window is None; set "
                            "T5Config.sliding_window (the window in tokens)")
        if "local" in kinds and self.encoder_attention is not None and hasattr(
                registry.get("attention", self.encoder_attention), "encoder_bias"):
            raise UserError(f"encoder_attention={self.encoder_attention!r} has its own window (local_radius); drop "
                            "the 'local' layers of sliding_window_pattern, or set encoder_attention=None")
        if self.experts_per_token > self.num_experts:
            raise UserError(f"experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}")
        if self.relative_attention_per_layer and self.position_scheme != "t5_relative_bias":
            raise UserError("relative_attention_per_layer needs position_scheme='t5_relative_bias'; set one or the "
                            "other")
        if self.moe_first_layer is not None and not 0 <= self.moe_first_layer < self.moe_every:
            raise UserError(f"moe_first_layer={self.moe_first_layer} must be in [0, moe_every={self.moe_every})")
        if self.expert_capacity is not None and self.expert_capacity <= 0:
            raise UserError(f"T5Config.expert_capacity must be positive or None, got {self.expert_capacity}")
        if not 0.0 <= self.router_jitter_noise < 1.0:
            raise UserError(f"router_jitter_noise={self.router_jitter_noise} must be in [0, 1)")
        for name in ("expert_capacity_factor", "eval_expert_capacity_factor"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.scan_layers and self.layers_per_scan_block > 1:
            block = self.layers_per_scan_block
            for n in (self.num_encoder_layers, self.num_decoder_layers):
                if n % block:
                    raise UserError(f"scan_layers scans blocks of {block} layers (the period of moe_every="
                                    f"{self.moe_every} and of the {len(self.sliding_window_pattern)}-entry "
                                    "sliding_window_pattern), which must divide the layer counts "
                                    f"({self.num_encoder_layers}, {self.num_decoder_layers}); change them or set "
                                    "scan_layers=False")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads when it is None."""
        return self.num_kv_heads or self.num_heads

    def attention_kernel_shape(self, heads: int, out: bool = False) -> Tuple[int, ...]:
        """How an attention kernel with `heads` heads is stored: query/key/value [embed, heads(, head_dim)],
        out [heads(, head_dim), embed]; joined (attention_layout) heads x head_dim is one axis."""
        per_head = (heads * self.head_dim,) if self.attention_layout == "joined" else (heads, self.head_dim)
        return per_head + (self.emb_dim,) if out else (self.emb_dim,) + per_head

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: the even number nearest below rope_fraction * head_dim."""
        return int(self.head_dim * self.rope_fraction) // 2 * 2

    def mlp_of_layer(self, index: int) -> str:
        """The registered MLP of layer `index` (0-based): `mlp` in every moe_every-th layer from
        moe_first_layer on (by default layers moe_every - 1, 2 * moe_every - 1, ...), else dense."""
        first = self.moe_every - 1 if self.moe_first_layer is None else self.moe_first_layer
        return self.mlp if index % self.moe_every == first else "dense"

    def attention_of_layer(self, index: int) -> str:
        """'local' (sliding window) or 'global' self-attention in layer `index`: the pattern, cycled."""
        kind = self.sliding_window_pattern[index % len(self.sliding_window_pattern)]
        return kind if self.sliding_window is not None else "global"

    @property
    def layers_per_scan_block(self) -> int:
        """Layers that scan_layers stacks as one block: the period after which layers repeat (moe_every when
        they differ in their MLP, the sliding-window pattern's length when in their attention), else 1."""
        mlp = self.moe_every if self.mlp != "dense" and self.moe_every > 1 else 1
        pattern = len(self.sliding_window_pattern) if len(set(self.sliding_window_pattern)) > 1 else 1
        return mlp * pattern // math.gcd(mlp, pattern)

    def replace(self, **overrides) -> "T5Config":
        """A copy with some fields changed; unknown names fail with the valid ones listed."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_activations"] = list(self.mlp_activations)
        d["sliding_window_pattern"] = list(self.sliding_window_pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        """The inverse of to_dict; fields a dict lacks (one saved before they existed) take their defaults,
        except attention_layout: a config saved before it existed describes split attention kernels."""
        _check_fields(d)
        return cls(**{"attention_layout": "split", **d})


def _check_fields(d: dict) -> None:
    valid = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise UserError(f"unknown T5Config field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")


_V1_0 = dict(mlp_activations=("relu",), logits_via_embedding=True, vocab_size=32128)
_V1_1 = dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False, vocab_size=32128)
_MT5 = dict(_V1_1, vocab_size=250112)
# The modern encoder-decoder choices (as in T5Gemma): rotary positions instead of the relative bias,
# grouped-query attention (3 query heads per key/value head) and QK-norm, on T5 v1.1's shapes.
_MODERN = dict(_V1_1, position_scheme="rope", qk_norm=True)
# UMT5 (Chung et al., 2023): mT5 v1.1 shapes, a 256384-token vocabulary and a relative-bias table per layer.
_UMT5 = dict(_V1_1, vocab_size=256384, relative_attention_per_layer=True)
# Switch Transformers (Fedus et al., 2021) as HF ships them (google/switch-*): T5 v1.0-style tied, scaled
# logits and ReLU MLPs; every 2nd layer (1, 3, ...) is a top-1 MoE with 64 slots per expert per row.
_SWITCH = dict(_V1_0, mlp="moe", moe_every=2, moe_first_layer=1, experts_per_token=1, expert_capacity=64,
               router_jitter_noise=0.01, moe_load_balancing_weight=0.001, moe_router_z_loss_weight=0.001)

# LongT5 (Guo et al., 2022): T5 v1.1 whose encoder self-attention is local (radius 127) or transient-global
# (local + one global token per 16-token block); the decoder is T5's (t5lite/model/longt5.py).
_LONGT5 = dict(_V1_1, local_radius=127, global_block_size=16)
_LONGT5_ATTENTION = {"local": "longt5_local", "tglobal": "longt5_transient_global"}

# T5Gemma (Zhang et al., 2025; HF google/t5gemma-*): Gemma 2 blocks as encoder and decoder. RoPE, GQA, sandwich
# (1 + w) RMSNorms, soft-capped attention (50) and logits (30), local (4096-token window) / global layers
# alternating, sqrt(d) embedding scale, an embedding per stack, the decoder's tied to the output unscaled, and
# decoding from <bos> = 2. Sizes: Gemma 2 2B / 9B (parameter counts equal keras-hub's published ones).
_T5GEMMA = dict(vocab_size=256000, mlp_activations=("gelu", "linear"), logits_via_embedding=True,
                scale_tied_logits=False, position_scheme="rope", rope_theta=10000.0, query_pre_attn_scalar=256.0,
                attention_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
                sliding_window_pattern=("local", "global"), embedding_scale=True, separate_embeddings=True,
                norm="gemma_rms_norm", norm_layout="sandwich", decoder_start_token_id=2)


def _size(emb, heads, head_dim, mlp, layers):
    return dict(emb_dim=emb, num_heads=heads, head_dim=head_dim, mlp_dim=mlp,
                num_encoder_layers=layers, num_decoder_layers=layers)


_V1_1_SIZES = {
    "small": _size(512, 6, 64, 1024, 8),
    "base": _size(768, 12, 64, 2048, 12),
    "large": _size(1024, 16, 64, 2816, 24),
    "xl": _size(2048, 32, 64, 5120, 24),
    "xxl": _size(4096, 64, 64, 10240, 24),
}

PRESETS = {
    # A few-hundred-thousand-parameter model for tests and quick checks.
    "tiny": dict(_V1_1, vocab_size=512, **_size(64, 4, 16, 128, 2)),
    "t5_1_0_small": dict(_V1_0, **_size(512, 8, 64, 2048, 6)),
    "t5_1_0_base": dict(_V1_0, **_size(768, 12, 64, 3072, 12)),
    "t5_1_0_large": dict(_V1_0, **_size(1024, 16, 64, 4096, 24)),
    "t5_1_0_3b": dict(_V1_0, **_size(1024, 32, 128, 16384, 24)),
    "t5_1_0_11b": dict(_V1_0, **_size(1024, 128, 128, 65536, 24)),
    **{f"t5_1_1_{k}": dict(_V1_1, **v) for k, v in _V1_1_SIZES.items()},
    **{f"mt5_{k}": dict(_MT5, **v) for k, v in _V1_1_SIZES.items()},
    "modern_small": dict(_MODERN, num_kv_heads=2, **_V1_1_SIZES["small"]),
    "modern_base": dict(_MODERN, num_kv_heads=4, **_V1_1_SIZES["base"]),
    # google/umt5-{small,base,xl,xxl} config.json (small and base read there; xl / xxl share mT5's shapes).
    **{f"umt5_{k}": dict(_UMT5, **_V1_1_SIZES[k]) for k in ("small", "base", "xl", "xxl")},
    # google/switch-base-{8,...,128} config.json; switch-large-128 on T5 v1.0 large (d_ff 4096), 26.2B parameters
    # as its model card says.
    **{f"switch_base_{e}": dict(_SWITCH, num_experts=e, **_size(768, 12, 64, 3072, 12)) for e in (8, 16, 32, 64, 128)},
    "switch_large_128": dict(_SWITCH, num_experts=128, **_size(1024, 16, 64, 4096, 24)),
    # google/long-t5-{local,tglobal}-{base,large,xl}: T5 v1.1's base / large / xl shapes (their published
    # configuration; parameter counts equal HF's LongT5 built from the config.json to-hf writes).
    **{f"longt5_{a}_{k}": dict(_LONGT5, encoder_attention=name, **_V1_1_SIZES[k])
       for a, name in _LONGT5_ATTENTION.items() for k in ("base", "large", "xl")},
    "t5gemma_2b_2b": dict(_T5GEMMA, num_kv_heads=4, **_size(2304, 8, 256, 9216, 26)),
    "t5gemma_9b_9b": dict(_T5GEMMA, num_kv_heads=8, **_size(3584, 16, 256, 14336, 42)),
}


def get_config(name: str, **overrides) -> T5Config:
    """The preset called `name`, with `overrides` applied (e.g. dtype='bfloat16', scan_layers=True)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    _check_fields(overrides)
    return T5Config(**{**PRESETS[name], **overrides})
