"""HF transformers LongT5 (model_type 'longt5') <-> t5lite: what differs from T5's mapping in hf.py.

LongT5 is T5 v1.1 whose encoder self-attention is local or transient-global (t5lite/model/longt5.py,
`T5Config.encoder_attention`). HF names the encoder's attention after it, `layer.0.LocalSelfAttention`
or `layer.0.TransientGlobalSelfAttention`, and transient-global adds a `global_input_layer_norm` per
block and a `global_relative_attention_bias` [buckets, heads] in block 0 (t5lite: one
`encoder/global_relpos_bias` table per stack, like T5's relative bias). The decoder is T5's.
"""

from typing import List

import numpy as np

from t5lite.errors import UserError
from t5lite.model.config import T5Config

MODEL_TYPE = "longt5"
MODEL_CLASS = "LongT5ForConditionalGeneration"
# HF encoder_attention_type <-> t5lite encoder_attention, and HF's module name of each.
ATTENTION_TYPES = {"local": "longt5_local", "transient-global": "longt5_transient_global"}
_HF_MODULE = {"longt5_local": "LocalSelfAttention", "longt5_transient_global": "TransientGlobalSelfAttention"}


def is_longt5(cfg: T5Config) -> bool:
    return cfg.encoder_attention in _HF_MODULE


def config_fields(hf: dict) -> dict:
    """The T5Config fields of an HF LongT5 config.json beyond T5's."""
    kind = hf.get("encoder_attention_type", "local")
    if kind not in ATTENTION_TYPES:
        raise UserError(f"LongT5 config.json has encoder_attention_type {kind!r}; expected 'local' or "
                        "'transient-global'")
    return dict(encoder_attention=ATTENTION_TYPES[kind], local_radius=hf.get("local_radius", 127),
                global_block_size=hf.get("global_block_size", 16))


def hf_config_fields(cfg: T5Config) -> dict:
    """What config_to_hf adds to T5's config.json for a LongT5 model."""
    kind = {v: k for k, v in ATTENTION_TYPES.items()}[cfg.encoder_attention]
    return dict(architectures=[MODEL_CLASS], model_type=MODEL_TYPE, encoder_attention_type=kind,
                local_radius=cfg.local_radius, global_block_size=cfg.global_block_size)


def unsupported(cfg: T5Config) -> List[str]:
    """Settings of a LongT5-attention config that HF's LongT5 cannot hold."""
    out = []
    if cfg.relative_attention_per_layer:
        out.append("relative_attention_per_layer=True with LongT5 attention")
    if cfg.mlp != "dense":
        out.append(f"mlp={cfg.mlp!r} with LongT5 attention")
    return out


def adapt_map(maps: list, cfg: T5Config) -> list:
    """T5's parameter map (hf.parameter_map) -> LongT5's: renamed encoder attention, plus transient-global's
    per-layer global norm and the stack's global relative-bias table."""
    module = _HF_MODULE[cfg.encoder_attention]
    out = []
    for ours, theirs, to_t5, to_hf in maps:
        if ours.startswith("encoder/"):
            theirs = theirs.replace(".layer.0.SelfAttention.", f".layer.0.{module}.")
        out.append((ours, theirs, to_t5, to_hf))
    if cfg.encoder_attention == "longt5_transient_global":
        out.append(("encoder/global_relpos_bias/rel_embedding",
                    f"encoder.block.0.layer.0.{module}.global_relative_attention_bias.weight", np.transpose,
                    np.transpose))
        for i in range(cfg.num_encoder_layers):
            out.append((f"encoder/layers_{i}/attention/global_input_layer_norm/scale",
                        f"encoder.block.{i}.layer.0.{module}.global_input_layer_norm.weight", _same, _same))
    return out


def _same(x):
    return x
