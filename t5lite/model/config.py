"""T5Config: one frozen, hashable dataclass for every architecture knob, plus named presets.

Hashable so it can be a static argument of `jax.jit` and a field of linen modules. Preset
sizes follow the published T5 (v1.0), T5 v1.1 and mT5 checkpoints; the parameter counts of
each are pinned by golden files in tests/golden/.
"""

import dataclasses
from typing import Tuple

from t5lite.errors import UserError

REMAT_POLICIES = ("none", "minimal", "save_dots", "full")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_exact", "silu", "swish", "linear")


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
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan_layers: bool = False
    remat_policy: str = "none"  # one of REMAT_POLICIES
    # Decoder-only models: True lets the inputs prefix attend bidirectionally (prefix LM).
    decoder_only_prefix_lm: bool = False

    def __post_init__(self):
        # Lists from JSON/gin become tuples so the config stays hashable.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for act in self.mlp_activations:
            if act not in ACTIVATIONS:
                raise UserError(f"unknown mlp activation {act!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"unknown remat_policy {self.remat_policy!r}; choose from {', '.join(REMAT_POLICIES)}")
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "relative_attention_num_buckets"):
            if getattr(self, name) <= 0:
                raise UserError(f"T5Config.{name} must be positive, got {getattr(self, name)}")

    def replace(self, **overrides) -> "T5Config":
        """A copy with some fields changed; unknown names fail with the valid ones listed."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_activations"] = list(self.mlp_activations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        _check_fields(d)
        return cls(**d)


def _check_fields(d: dict) -> None:
    valid = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise UserError(f"unknown T5Config field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")


_V1_0 = dict(mlp_activations=("relu",), logits_via_embedding=True, vocab_size=32128)
_V1_1 = dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False, vocab_size=32128)
_MT5 = dict(_V1_1, vocab_size=250112)


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
}


def get_config(name: str, **overrides) -> T5Config:
    """The preset called `name`, with `overrides` applied (e.g. dtype='bfloat16', scan_layers=True)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    _check_fields(overrides)
    return T5Config(**{**PRESETS[name], **overrides})
