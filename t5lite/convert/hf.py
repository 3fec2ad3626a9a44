"""HF transformers T5 <-> t5lite, both directions, with NumPy only (no torch needed).

HF layout facts this relies on: linear weights are (out, in); the relative attention bias
[buckets, heads] lives only in block 0 of each stack; the decoder block has layer.0 self-
attention, layer.1 cross-attention, layer.2 MLP. Tied (v1.0) checkpoints have no
`lm_head.weight` and scale the decoder output by d_model**-0.5; v1.1 ones store a separate
`lm_head.weight` and do not scale (transformers 5 writes `scale_decoder_outputs: false`,
transformers 4 `tie_word_embeddings: false`).
"""

import json
import os
from typing import Callable, Dict, List, Tuple

import numpy as np

from t5lite.convert.safetensors_io import read_safetensors, write_safetensors
from t5lite.errors import UserError
from t5lite.fileio import new_directory
from t5lite.model.config import T5Config
from t5lite.model.params import abstract_params, nest_paths, param_shapes, unscan_params

# HF feed_forward_proj <-> t5lite mlp_activations. HF's "gated-gelu" means the tanh GELU.
_HF_TO_ACTIVATIONS = {
    "relu": ("relu",), "gated-relu": ("relu", "linear"),
    "gelu": ("gelu_exact",), "gelu_new": ("gelu_new",), "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"), "silu": ("silu",), "gated-silu": ("silu", "linear"),
}
_ACTIVATIONS_TO_HF = {
    ("relu",): "relu", ("relu", "linear"): "gated-relu", ("gelu_exact",): "gelu", ("gelu_new",): "gelu_new",
    ("gelu",): "gelu_new", ("gelu", "linear"): "gated-gelu", ("gelu_new", "linear"): "gated-gelu",
    ("silu",): "silu", ("swish",): "silu", ("silu", "linear"): "gated-silu", ("swish", "linear"): "gated-silu",
}

# (t5lite path, HF key, HF array -> t5lite array, t5lite array -> HF array)
Mapping = Tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x):
    return x


def _attention_maps(t5: str, hf: str, cfg: T5Config) -> List[Mapping]:
    d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    maps = []
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
        # [D, H, Dh] <-> (H*Dh, D)
        maps.append((f"{t5}/{ours}/kernel", f"{hf}.{theirs}.weight",
                     lambda w: w.T.reshape(d, h, dh), lambda k: k.reshape(d, h * dh).T))
    # [H, Dh, D] <-> (D, H*Dh)
    maps.append((f"{t5}/out/kernel", f"{hf}.o.weight", lambda w: w.T.reshape(h, dh, d), lambda k: k.reshape(h * dh, d).T))
    return maps


def _mlp_maps(t5: str, hf: str, cfg: T5Config) -> List[Mapping]:
    names = ["wi"] if len(cfg.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
    return [(f"{t5}/{n}/kernel", f"{hf}.{n}.weight", np.transpose, np.transpose) for n in names + ["wo"]]


def parameter_map(cfg: T5Config) -> List[Mapping]:
    """Every parameter of an (unscanned) t5lite EncoderDecoder and its HF counterpart."""
    maps: List[Mapping] = [("token_embedder/embedding", "shared.weight", _same, _same)]
    for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        maps.append((f"{stack}/relpos_bias/rel_embedding",
                     f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", np.transpose, np.transpose))
        for i in range(n_layers):
            t5, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            if stack == "encoder":
                maps.append((f"{t5}/pre_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight", _same, _same))
                maps += _attention_maps(f"{t5}/attention", f"{hf}.0.SelfAttention", cfg)
                mlp = 1
            else:
                maps.append((f"{t5}/pre_self_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight", _same, _same))
                maps += _attention_maps(f"{t5}/self_attention", f"{hf}.0.SelfAttention", cfg)
                maps.append((f"{t5}/pre_cross_attention_layer_norm/scale", f"{hf}.1.layer_norm.weight", _same, _same))
                maps += _attention_maps(f"{t5}/encoder_decoder_attention", f"{hf}.1.EncDecAttention", cfg)
                mlp = 2
            maps.append((f"{t5}/pre_mlp_layer_norm/scale", f"{hf}.{mlp}.layer_norm.weight", _same, _same))
            maps += _mlp_maps(f"{t5}/mlp", f"{hf}.{mlp}.DenseReluDense", cfg)
        maps.append((f"{stack}/{stack}_norm/scale", f"{stack}.final_layer_norm.weight", _same, _same))
    if not cfg.logits_via_embedding:
        maps.append(("decoder/logits_dense/kernel", "lm_head.weight", np.transpose, np.transpose))
    return maps


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; is this an HF T5 checkpoint directory?") from None


def config_from_hf(hf: dict, has_separate_lm_head: bool) -> T5Config:
    """T5Config from an HF config.json dict (transformers 4 or 5)."""
    if not isinstance(hf, dict) or hf.get("model_type") not in ("t5", "mt5"):
        raise UserError(f"config.json has model_type {(hf or {}).get('model_type') if isinstance(hf, dict) else None!r}, "
                        "expected 't5' or 'mt5'")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _HF_TO_ACTIVATIONS:
        raise UserError(f"unsupported feed_forward_proj {proj!r}; supported: {', '.join(_HF_TO_ACTIVATIONS)}")
    if "scale_decoder_outputs" in hf:
        scale = bool(hf["scale_decoder_outputs"])
    else:
        scale = hf.get("tie_word_embeddings", True) is not False
    if scale and has_separate_lm_head:
        raise UserError("checkpoint has a separate lm_head.weight but scales decoder outputs; t5lite supports "
                        "tied+scaled (v1.0) or untied+unscaled (v1.1) logits only")
    missing = [k for k in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers") if k not in hf]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}; it is not a complete HF T5 config")
    return T5Config(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
        mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        mlp_activations=_HF_TO_ACTIVATIONS[proj], logits_via_embedding=scale,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.0), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))


def _flatten(tree: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flatten(v, path + "/") if isinstance(v, dict) else {path: np.asarray(v)})
    return out


def from_hf(path: str) -> Tuple[T5Config, dict]:
    """Reads an HF T5 directory (config.json + model.safetensors, or a sharded index) -> (config, params)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is not an HF T5 checkpoint directory (expected config.json and model.safetensors)")
    hf_cfg = _read_json(os.path.join(path, "config.json"))
    tensors = read_safetensors(path)
    lm_head = tensors.get("lm_head.weight")
    separate_head = lm_head is not None and not np.array_equal(lm_head, tensors.get("shared.weight"))
    cfg = config_from_hf(hf_cfg, separate_head)
    if not cfg.logits_via_embedding and lm_head is None:
        # Unscaled logits through the shared embedding: an untied head that starts equal to it.
        tensors["lm_head.weight"] = tensors.get("shared.weight")

    expected = param_shapes(abstract_params(cfg))
    flat = {}
    for ours, theirs, to_t5, _ in parameter_map(cfg):
        if tensors.get(theirs) is None:
            raise UserError(f"{path}: tensor {theirs!r} is missing; the checkpoint does not match its config.json")
        value = to_t5(np.asarray(tensors[theirs], np.float32))
        if list(value.shape) != expected[ours]:
            raise UserError(f"{path}: tensor {theirs!r} has shape {tuple(tensors[theirs].shape)}, which does not "
                            f"match config.json (t5lite expects {tuple(expected[ours])} for {ours})")
        flat[ours] = np.ascontiguousarray(value)
    return cfg, nest_paths(flat)


# Ablation fields and the only value of each that HF's T5 has (T5ForConditionalGeneration).
_HF_T5_ARCHITECTURE = dict(position_scheme="t5_relative_bias", attention="multi_head", qk_norm=False,
                           attention_logit_softcap=None, norm="rms_norm", norm_layout="pre", mlp="dense")


def check_hf_representable(cfg: T5Config) -> None:
    """One-line UserError naming every setting of `cfg` that HF's T5 cannot represent."""
    unsupported = [f"{name}={getattr(cfg, name)!r}" for name, value in _HF_T5_ARCHITECTURE.items()
                   if getattr(cfg, name) != value]
    if cfg.kv_heads != cfg.num_heads:
        unsupported.append(f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention)")
    if cfg.mlp_activations not in _ACTIVATIONS_TO_HF:
        unsupported.append(f"mlp_activations={cfg.mlp_activations}")
    if unsupported:
        raise UserError(f"HF transformers' T5 cannot represent {', '.join(unsupported)}; only models with T5's "
                        "architecture (relative position bias, multi-head attention, pre-RMSNorm, dense MLP) convert")


def config_to_hf(cfg: T5Config) -> dict:
    """An HF config.json dict that transformers 4 and 5 read as this architecture."""
    check_hf_representable(cfg)
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.emb_dim, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_decoder_layers,
        "feed_forward_proj": _ACTIVATIONS_TO_HF[cfg.mlp_activations],
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "tie_word_embeddings": cfg.logits_via_embedding, "scale_decoder_outputs": cfg.logits_via_embedding,
        "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "use_cache": True, "dtype": "float32",
    }


def tokenizer_files(vocab) -> Dict[str, bytes]:
    """What HF's T5Tokenizer / AutoTokenizer.from_pretrained needs to load a t5lite vocabulary (offline).

    The SentencePiece model already holds the sentinels <extra_id_0..99> as its top pieces (t5lite's
    layout), so HF adds no extra ids of its own (`extra_ids: 0`) and the ids are t5lite's."""
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 1 << 30, **special}
    return {"spiece.model": vocab.serialized_model,
            "tokenizer_config.json": json.dumps(config, indent=2).encode(),
            "special_tokens_map.json": json.dumps(special, indent=2).encode()}


def to_hf(config: T5Config, params: dict, path: str, vocab=None) -> None:
    """Writes `path/config.json` + `path/model.safetensors` for T5ForConditionalGeneration.from_pretrained,
    and with `vocab` (a t5lite Vocabulary) the tokenizer files for AutoTokenizer.from_pretrained.

    The directory is assembled under a temporary name and renamed into place, so a failure
    never leaves a half-written checkpoint at `path`.
    """
    if os.path.exists(path) and os.listdir(path):
        raise UserError(f"output directory {path} is not empty; choose a new --out or remove it")
    hf_cfg = config_to_hf(config)
    flat = _flatten(unscan_params(params) if config.scan_layers else params)
    expected = param_shapes(abstract_params(config.replace(scan_layers=False)))
    tensors = {}
    for ours, theirs, _, to_hf_fn in parameter_map(config):
        if ours not in flat:
            raise UserError(f"parameter {ours} is missing; the params do not match the config")
        if list(flat[ours].shape) != expected[ours]:
            raise UserError(f"parameter {ours} has shape {flat[ours].shape}, config expects {tuple(expected[ours])}")
        tensors[theirs] = np.ascontiguousarray(to_hf_fn(np.asarray(flat[ours], np.float32)))

    with new_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        write_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        if vocab is not None:
            if vocab.vocab_size > config.vocab_size:
                raise UserError(f"the vocabulary has {vocab.vocab_size} pieces, more than the model's vocab_size "
                                f"{config.vocab_size}; pass the vocabulary the model was trained with")
            for name, data in tokenizer_files(vocab).items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
