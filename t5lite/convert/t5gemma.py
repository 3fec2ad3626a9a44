"""HF transformers T5Gemma <-> t5lite: the config and the parameter map (hf.py does the reading and writing).

T5Gemma (model_type 't5gemma') is Gemma 2 blocks as encoder and decoder, in config.json as two
sub-configs `encoder` / `decoder`. What maps to what:
  rope positions (rope_theta)            position_scheme='rope'
  num_key_value_heads, head_dim          num_kv_heads, head_dim (GQA)
  query_pre_attn_scalar                  query_pre_attn_scalar (scores * scalar ** -0.5)
  attn_logit_softcapping                 attention_logit_softcap
  final_logit_softcapping (decoder's)    final_logit_softcap
  layer_types, sliding_window            sliding_window_pattern (the shortest period), sliding_window
  T5GemmaRMSNorm (1 + w), pre + post     norm='gemma_rms_norm', norm_layout='sandwich'
  hidden_activation gelu_pytorch_tanh    mlp_activations ('gelu', 'linear'): gate_proj -> wi_0, up_proj -> wi_1
  encoder / decoder embed_tokens         separate_embeddings: encoder_embedder / token_embedder
  tie_word_embeddings                    logits_via_embedding, unscaled (scale_tied_logits=False)
  hidden * sqrt(hidden_size)             embedding_scale
  decoder bos_token_id (the start)       decoder_start_token_id
t5lite has one width, head layout and MLP for both stacks: checkpoints whose encoder and decoder differ
there (t5gemma-9b-2b) are refused in one line, as is T5Gemma 2.
"""

from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from t5lite.errors import UserError
from t5lite.model.config import T5Config

Mapping = Tuple[str, Union[str, Tuple[str, ...]], Callable[[np.ndarray], np.ndarray],
                Callable[[np.ndarray], np.ndarray]]
MODEL_CLASS = "T5GemmaForConditionalGeneration"

_HF_TO_ACTIVATIONS = {"gelu_pytorch_tanh": ("gelu", "linear"), "gelu_new": ("gelu", "linear"),
                      "gelu": ("gelu_exact", "linear"), "silu": ("silu", "linear")}
_ACTIVATIONS_TO_HF = {("gelu", "linear"): "gelu_pytorch_tanh", ("gelu_new", "linear"): "gelu_pytorch_tanh",
                      ("gelu_exact", "linear"): "gelu", ("silu", "linear"): "silu", ("swish", "linear"): "silu"}
_KINDS = {"sliding_attention": "local", "full_attention": "global"}
# Fields that must be equal in the encoder and decoder sub-configs (t5lite has one of each).
_SHARED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
           "hidden_activation", "rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "vocab_size")


def is_t5gemma(cfg: T5Config) -> bool:
    """Whether `cfg` converts as HF's T5Gemma (Gemma's norm marks the family)."""
    return cfg.norm == "gemma_rms_norm"


def _same(x):
    return x


def _attention_maps(t5: str, hf: str, cfg: T5Config) -> List[Mapping]:
    d, h, hkv, dh = cfg.emb_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    maps: List[Mapping] = []
    for ours, theirs, heads in (("query", "q", h), ("key", "k", hkv), ("value", "v", hkv)):
        # [D, heads * Dh] (or [D, heads, Dh]) <-> (heads * Dh, D)
        maps.append((f"{t5}/{ours}/kernel", f"{hf}.{theirs}_proj.weight",
                     lambda w, n=heads: w.T.reshape(cfg.attention_kernel_shape(n)),
                     lambda k, n=heads: k.reshape(d, n * dh).T))
    # [H * Dh, D] (or [H, Dh, D]) <-> (D, H * Dh)
    maps.append((f"{t5}/out/kernel", f"{hf}.o_proj.weight", lambda w: w.T.reshape(cfg.attention_kernel_shape(h, out=True)),
                 lambda k: k.reshape(h * dh, d).T))
    return maps


def parameter_map(cfg: T5Config) -> List[Mapping]:
    """Every parameter of an (unscanned) t5lite T5Gemma and its HF counterpart."""
    maps: List[Mapping] = [("encoder_embedder/embedding", "model.encoder.embed_tokens.weight", _same, _same),
                           ("token_embedder/embedding", "model.decoder.embed_tokens.weight", _same, _same)]
    for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        sublayers = [("attention", "self_attn")] if stack == "encoder" else [
            ("self_attention", "self_attn"), ("encoder_decoder_attention", "cross_attn")]
        for i in range(n_layers):
            t5, hf = f"{stack}/layers_{i}", f"model.{stack}.layers.{i}"
            for ours, theirs in sublayers:
                stem = {"attention": "attention", "self_attention": "self_attention",
                        "encoder_decoder_attention": "cross_attention"}[ours]
                for side in ("pre", "post"):
                    maps.append((f"{t5}/{side}_{stem}_layer_norm/scale", f"{hf}.{side}_{theirs}_layernorm.weight",
                                 _same, _same))
                maps += _attention_maps(f"{t5}/{ours}", f"{hf}.{theirs}", cfg)
            for side in ("pre", "post"):
                maps.append((f"{t5}/{side}_mlp_layer_norm/scale", f"{hf}.{side}_feedforward_layernorm.weight",
                             _same, _same))
            for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                maps.append((f"{t5}/mlp/{ours}/kernel", f"{hf}.mlp.{theirs}.weight", np.transpose, np.transpose))
        maps.append((f"{stack}/{stack}_norm/scale", f"model.{stack}.norm.weight", _same, _same))
    if not cfg.logits_via_embedding:
        maps.append(("decoder/logits_dense/kernel", "lm_head.out_proj.weight", np.transpose, np.transpose))
    return maps


def _rope_theta(sub: dict) -> float:
    params = sub.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise UserError(f"T5Gemma checkpoint uses rope_type {params['rope_type']!r}; t5lite has the default RoPE only")
    return float(params.get("rope_theta", sub.get("rope_theta", 10000.0)))


def _pattern(layer_types: List[str], where: str) -> Tuple[str, ...]:
    """The shortest period of HF's layer_types, as t5lite's 'local' / 'global' entries."""
    unknown = sorted(set(layer_types) - set(_KINDS))
    if unknown:
        raise UserError(f"T5Gemma {where} has layer_types {unknown}; t5lite knows {', '.join(_KINDS)}")
    kinds = [_KINDS[t] for t in layer_types]
    for period in range(1, len(kinds) + 1):
        if all(k == kinds[i % period] for i, k in enumerate(kinds)):
            return tuple(kinds[:period])
    return tuple(kinds)


def config_from_hf(hf: dict, has_lm_head: bool) -> T5Config:
    """T5Config from a T5Gemma config.json dict; one-line UserError for what t5lite cannot represent."""
    if hf.get("model_type") == "t5gemma2":
        raise UserError("T5Gemma 2 (model_type 't5gemma2') is not supported: t5lite has no merged decoder "
                        "self/cross-attention, Gemma 3's per-layer local/global RoPE or vision encoder; use T5Gemma")
    enc, dec = hf.get("encoder"), hf.get("decoder")
    if not isinstance(enc, dict) or not isinstance(dec, dict):
        raise UserError("T5Gemma config.json lacks its 'encoder' / 'decoder' sub-configs; it is not a complete "
                        "t5gemma config")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in enc or k not in dec]
    if missing:
        raise UserError(f"T5Gemma config.json's sub-configs lack {', '.join(missing)}")
    defaults = dict(num_key_value_heads=enc["num_attention_heads"], hidden_activation="gelu_pytorch_tanh",
                    rms_norm_eps=1e-6, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                    head_dim=enc["hidden_size"] // enc["num_attention_heads"])
    differ = [k for k in _SHARED if enc.get(k, defaults.get(k)) != dec.get(k, defaults.get(k))]
    if _rope_theta(enc) != _rope_theta(dec):
        differ.append("rope_theta")
    if differ:
        raise UserError(f"T5Gemma checkpoint's encoder and decoder differ in {', '.join(differ)} (e.g. "
                        "t5gemma-9b-2b); t5lite's two stacks share one width, head layout and MLP")
    get = lambda k: enc.get(k, defaults.get(k))  # noqa: E731
    if enc.get("attention_bias") or dec.get("attention_bias"):
        raise UserError("T5Gemma checkpoint has attention_bias=true; t5lite's projections have no bias")
    if get("hidden_activation") not in _HF_TO_ACTIVATIONS:
        raise UserError(f"unsupported T5Gemma hidden_activation {get('hidden_activation')!r}; supported: "
                        f"{', '.join(_HF_TO_ACTIVATIONS)}")
    types = [sub.get("layer_types") or _default_layer_types(sub["num_hidden_layers"]) for sub in (enc, dec)]
    longer, shorter = sorted(types, key=len, reverse=True)
    if list(longer[:len(shorter)]) != list(shorter):
        raise UserError("T5Gemma checkpoint's encoder and decoder have different layer_types patterns; t5lite "
                        "cycles one sliding_window_pattern over both stacks")
    pattern = _pattern(longer, "layer_types")
    windows = {sub.get("sliding_window") for sub, t in zip((enc, dec), types) if "sliding_attention" in t}
    if len(windows) > 1:
        raise UserError(f"T5Gemma checkpoint's encoder and decoder have different sliding windows {sorted(windows)}")
    window = windows.pop() if windows else None
    tied = hf.get("tie_word_embeddings", True) is not False and not has_lm_head
    return T5Config(
        vocab_size=dec["vocab_size"], emb_dim=dec["hidden_size"], num_heads=get("num_attention_heads"),
        head_dim=get("head_dim"), mlp_dim=dec["intermediate_size"], num_encoder_layers=enc["num_hidden_layers"],
        num_decoder_layers=dec["num_hidden_layers"], mlp_activations=_HF_TO_ACTIVATIONS[get("hidden_activation")],
        logits_via_embedding=tied, scale_tied_logits=False, dropout_rate=float(hf.get("dropout_rate", 0.0)),
        layer_norm_epsilon=float(get("rms_norm_eps")), position_scheme="rope", rope_theta=_rope_theta(dec),
        num_kv_heads=get("num_key_value_heads"), attention_logit_softcap=_float_or_none(get("attn_logit_softcapping")),
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")), sliding_window=window,
        sliding_window_pattern=pattern if window is not None else ("global",),
        final_logit_softcap=_float_or_none(dec.get("final_logit_softcapping", 30.0)), embedding_scale=True,
        separate_embeddings=True, norm="gemma_rms_norm", norm_layout="sandwich",
        decoder_start_token_id=int(hf.get("decoder_start_token_id") or dec.get("bos_token_id", 2) or 0))


def _default_layer_types(n: int) -> List[str]:
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]  # HF's default


def _int_if_whole(x):
    return int(x) if x is not None and float(x).is_integer() else x


def _float_or_none(x) -> Optional[float]:
    return None if x is None else float(x)


# Fields and the only value of each that HF's T5Gemma has.
_T5GEMMA_ARCHITECTURE = dict(position_scheme="rope", rope_fraction=1.0, attention="multi_head", qk_norm=False,
                             norm="gemma_rms_norm", norm_layout="sandwich", mlp="dense", embedding_scale=True,
                             separate_embeddings=True, relative_attention_per_layer=False)


def unsupported(cfg: T5Config) -> List[str]:
    """Settings of `cfg` that HF's T5Gemma cannot represent."""
    out = [f"{name}={getattr(cfg, name)!r}" for name, value in _T5GEMMA_ARCHITECTURE.items()
           if getattr(cfg, name) != value]
    if cfg.mlp_activations not in _ACTIVATIONS_TO_HF:
        out.append(f"mlp_activations={cfg.mlp_activations} (T5Gemma's MLP is gated: act(gate) * up)")
    if cfg.logits_via_embedding and cfg.scale_tied_logits:
        out.append("scale_tied_logits=True (T5Gemma's tied logits are unscaled)")
    if cfg.query_pre_attn_scalar is None:
        out.append("query_pre_attn_scalar=None (T5Gemma always scales the scores)")
    return out


def config_to_hf(cfg: T5Config) -> dict:
    """A T5Gemma config.json dict (encoder / decoder sub-configs) that transformers 5 reads as this model."""
    n = len(cfg.sliding_window_pattern)
    names = {"local": "sliding_attention", "global": "full_attention"}

    def module(layers: int, is_decoder: bool) -> dict:
        return {"model_type": "t5_gemma_module", "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
                "intermediate_size": cfg.mlp_dim, "num_hidden_layers": layers,
                "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "hidden_activation": _ACTIVATIONS_TO_HF[cfg.mlp_activations], "rms_norm_eps": cfg.layer_norm_epsilon,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar),  # transformers 5 wants an int
                # HF requires a window even without sliding layers; it is unused then
                "sliding_window": cfg.sliding_window or 4096,
                "layer_types": [names[cfg.sliding_window_pattern[i % n]] if cfg.sliding_window else "full_attention"
                                for i in range(layers)],
                "final_logit_softcapping": cfg.final_logit_softcap,
                "attn_logit_softcapping": cfg.attention_logit_softcap, "attention_bias": False,
                "is_decoder": is_decoder, "tie_word_embeddings": cfg.logits_via_embedding,
                "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": cfg.decoder_start_token_id,
                "dropout_rate": cfg.dropout_rate, "attention_dropout": 0.0}

    return {"architectures": [MODEL_CLASS], "model_type": "t5gemma", "is_encoder_decoder": True,
            "encoder": module(cfg.num_encoder_layers, False), "decoder": module(cfg.num_decoder_layers, True),
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.logits_via_embedding,
            "dropout_rate": cfg.dropout_rate, "attention_dropout": 0.0, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": cfg.decoder_start_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
            "dtype": "float32"}
