"""HF transformers T5 / mT5 / UMT5 / Switch Transformers <-> t5lite, both directions, NumPy only.

HF layout facts this relies on: linear weights are (out, in); the relative attention bias
[buckets, heads] lives only in block 0 of each stack; the decoder block has layer.0 self-
attention, layer.1 cross-attention, layer.2 MLP. Tied (v1.0) checkpoints have no
`lm_head.weight` and scale the decoder output by d_model**-0.5; v1.1 ones store a separate
`lm_head.weight` and do not scale (transformers 5 writes `scale_decoder_outputs: false`,
transformers 4 `tie_word_embeddings: false`).

UMT5 differs in one place: every block's self-attention has its own relative_attention_bias
(t5lite: `relative_attention_per_layer`). transformers 5 forces UMT5's tie_word_embeddings to
true and then scales the logits even of untied checkpoints; the published umt5 checkpoints are
untied and were trained unscaled (T5X, transformers 4), so a distinct lm_head.weight reads as
untied and unscaled here. Switch Transformers: T5 v1.0 blocks whose MLP in every
`sparse_step`-th layer (i % step == 1) is a top-1 MoE, `layer.N.mlp.router.classifier` and
`layer.N.mlp.experts.expert_e.{wi,wo}` (dense layers: `layer.N.mlp.{wi,wo}`), with a fixed
`expert_capacity` per row (t5lite/model/moe.py). LongT5: T5 v1.1 with a local or transient-global
encoder self-attention, mapped in t5lite/convert/longt5.py. T5Gemma's config and names live in
t5lite/convert/t5gemma.py; this module reads and writes its files like the others'.
"""

import json
import os
from typing import Callable, Dict, List, Tuple, Union

import numpy as np

from t5lite.convert import longt5, t5gemma
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

# (t5lite path, HF key, HF array -> t5lite array, t5lite array -> HF array). A tuple of HF keys maps
# to the slices of a t5lite array's leading axis (one HF tensor per expert).
Mapping = Tuple[str, Union[str, Tuple[str, ...]], Callable[[np.ndarray], np.ndarray],
                Callable[[np.ndarray], np.ndarray]]
MODEL_CLASSES = {"t5": "T5ForConditionalGeneration", "umt5": "UMT5ForConditionalGeneration",
                  "switch_transformers": "SwitchTransformersForConditionalGeneration",
                  longt5.MODEL_TYPE: longt5.MODEL_CLASS, "t5gemma": t5gemma.MODEL_CLASS}
_FAMILY_NAMES = {"t5": "T5", "umt5": "UMT5", "switch_transformers": "Switch Transformers", "longt5": "LongT5",
                 "t5gemma": "T5Gemma"}


def family(cfg: T5Config) -> str:
    """The HF model_type that holds `cfg`: t5gemma (Gemma's norm), longt5 (LongT5 encoder attention),
    switch_transformers (MoE MLPs), umt5 (bias per layer) or t5."""
    if t5gemma.is_t5gemma(cfg):
        return "t5gemma"
    if longt5.is_longt5(cfg):
        return longt5.MODEL_TYPE
    return "switch_transformers" if cfg.mlp == "moe" else "umt5" if cfg.relative_attention_per_layer else "t5"


def _same(x):
    return x


def _attention_maps(t5: str, hf: str, cfg: T5Config) -> List[Mapping]:
    d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    maps = []
    q_shape, out_shape = cfg.attention_kernel_shape(h), cfg.attention_kernel_shape(h, out=True)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
        # [D, H * Dh] (or [D, H, Dh]) <-> (H*Dh, D)
        maps.append((f"{t5}/{ours}/kernel", f"{hf}.{theirs}.weight",
                     lambda w: w.T.reshape(q_shape), lambda k: k.reshape(d, h * dh).T))
    # [H * Dh, D] (or [H, Dh, D]) <-> (D, H*Dh)
    maps.append((f"{t5}/out/kernel", f"{hf}.o.weight", lambda w: w.T.reshape(out_shape),
                 lambda k: k.reshape(h * dh, d).T))
    return maps


def _mlp_maps(t5: str, hf: str, cfg: T5Config, index: int) -> List[Mapping]:
    names = ["wi"] if len(cfg.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
    if cfg.mlp != "moe":
        return [(f"{t5}/{n}/kernel", f"{hf}.DenseReluDense.{n}.weight", np.transpose, np.transpose)
                for n in names + ["wo"]]
    if cfg.mlp_of_layer(index) != "moe":  # Switch's dense layers
        return [(f"{t5}/{n}/kernel", f"{hf}.mlp.{n}.weight", np.transpose, np.transpose) for n in names + ["wo"]]
    # router [D, E] <-> (E, D); experts [E, D, F] <-> E x (F, D)
    maps: List[Mapping] = [(f"{t5}/router/kernel", f"{hf}.mlp.router.classifier.weight", np.transpose, np.transpose)]
    for n in names + ["wo"]:
        keys = tuple(f"{hf}.mlp.experts.expert_{e}.{n}.weight" for e in range(cfg.num_experts))
        maps.append((f"{t5}/expert/{n}/kernel", keys, np.transpose, np.transpose))
    return maps


def parameter_map(cfg: T5Config) -> List[Mapping]:
    """Every parameter of an (unscanned) t5lite EncoderDecoder and its HF counterpart."""
    if t5gemma.is_t5gemma(cfg):
        return t5gemma.parameter_map(cfg)
    maps: List[Mapping] = [("token_embedder/embedding", "shared.weight", _same, _same)]
    for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n_layers if cfg.relative_attention_per_layer else 1):
            ours = f"{stack}/layers_{i}/relpos_bias" if cfg.relative_attention_per_layer else f"{stack}/relpos_bias"
            maps.append((f"{ours}/rel_embedding",
                         f"{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
                         np.transpose, np.transpose))
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
            maps += _mlp_maps(f"{t5}/mlp", f"{hf}.{mlp}", cfg, i)
        maps.append((f"{stack}/{stack}_norm/scale", f"{stack}.final_layer_norm.weight", _same, _same))
    if not cfg.logits_via_embedding:
        maps.append(("decoder/logits_dense/kernel", "lm_head.weight", np.transpose, np.transpose))
    return longt5.adapt_map(maps, cfg) if longt5.is_longt5(cfg) else maps


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; is this an HF T5 checkpoint directory?") from None


def config_from_hf(hf: dict, has_separate_lm_head: bool) -> T5Config:
    """T5Config from an HF config.json dict (transformers 4 or 5) of a t5, mt5, umt5, switch_transformers or
    longt5 model."""
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if model_type not in ("t5", "mt5", "umt5", "switch_transformers", longt5.MODEL_TYPE):
        raise UserError(f"config.json has model_type {model_type!r}, expected 't5', 'mt5', 'umt5', "
                        "'switch_transformers' or 'longt5'")
    missing = [k for k in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers") if k not in hf]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}; it is not a complete HF {model_type} config")
    # Switch's MLPs are never gated and read dense_act_fn; the others read feed_forward_proj.
    proj_key = "dense_act_fn" if model_type == "switch_transformers" else "feed_forward_proj"
    proj = hf.get(proj_key, "relu")
    if proj not in _HF_TO_ACTIVATIONS or (model_type == "switch_transformers" and proj.startswith("gated")):
        raise UserError(f"unsupported activation {proj!r} for {model_type}; supported: {', '.join(_HF_TO_ACTIVATIONS)}")
    if model_type == "umt5":
        scale = not has_separate_lm_head and hf.get("tie_word_embeddings", True) is not False  # see the docstring
    elif "scale_decoder_outputs" in hf:
        scale = bool(hf["scale_decoder_outputs"])
    else:
        scale = hf.get("tie_word_embeddings", True) is not False
    if scale and has_separate_lm_head:
        raise UserError("checkpoint has a separate lm_head.weight but scales decoder outputs; t5lite supports "
                        "tied+scaled (v1.0) or untied+unscaled (v1.1) logits only")
    fields = dict(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
        mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        mlp_activations=_HF_TO_ACTIVATIONS[proj], logits_via_embedding=scale,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        relative_attention_per_layer=model_type == "umt5",
        dropout_rate=hf.get("dropout_rate", 0.0), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
    if model_type == "switch_transformers":
        fields.update(_switch_fields(hf, fields["num_encoder_layers"], fields["num_decoder_layers"]))
    if model_type == longt5.MODEL_TYPE:
        fields.update(longt5.config_fields(hf))
    return T5Config(**fields)


def _switch_fields(hf: dict, enc_layers: int, dec_layers: int) -> dict:
    """The MoE fields of a Switch config.json (HF's layer rule: sparse when i % step == 1, or every layer)."""
    steps = []
    for sparse, layers in ((hf.get("num_sparse_encoder_layers", 3), enc_layers),
                           (hf.get("num_sparse_decoder_layers", 3), dec_layers)):
        steps.append(layers // sparse if sparse > 0 else 0)
    if steps[0] != steps[1] or steps[0] == 0:
        raise UserError(f"Switch checkpoint has sparse steps {steps[0]} (encoder) and {steps[1]} (decoder); t5lite "
                        "converts checkpoints whose two stacks both have MoE layers at the same step")
    if hf.get("router_bias", False):
        raise UserError("Switch checkpoint has router_bias=true; t5lite's router has no bias")
    return dict(mlp="moe", moe_every=steps[0], moe_first_layer=1 % steps[0], num_experts=hf.get("num_experts", 8),
                experts_per_token=1, expert_capacity=hf.get("expert_capacity", 64),
                router_jitter_noise=float(hf.get("router_jitter_noise", 0.0)),
                moe_load_balancing_weight=float(hf.get("router_aux_loss_coef", 0.001)),
                moe_router_z_loss_weight=float(hf.get("router_z_loss_coef", 0.001)))


def _flatten(tree: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flatten(v, path + "/") if isinstance(v, dict) else {path: np.asarray(v)})
    return out


def from_hf(path: str) -> Tuple[T5Config, dict]:
    """Reads an HF T5 / mT5 / UMT5 / Switch / LongT5 directory (config.json + model.safetensors, or a sharded index)
    -> (config, params)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is not an HF T5 checkpoint directory (expected config.json and model.safetensors)")
    hf_cfg = _read_json(os.path.join(path, "config.json"))
    tensors = read_safetensors(path)
    if isinstance(hf_cfg, dict) and hf_cfg.get("model_type") in ("t5gemma", "t5gemma2"):
        head, embedding = tensors.get("lm_head.out_proj.weight"), tensors.get("model.decoder.embed_tokens.weight")
        cfg = t5gemma.config_from_hf(hf_cfg, head is not None and not np.array_equal(head, embedding))
        if not cfg.logits_via_embedding and head is None:
            tensors["lm_head.out_proj.weight"] = embedding
        return cfg, _read_params(path, cfg, tensors)
    lm_head = tensors.get("lm_head.weight")
    separate_head = lm_head is not None and not np.array_equal(lm_head, tensors.get("shared.weight"))
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):  # transformers 5, Switch untied
        if key in tensors and not np.array_equal(tensors[key], tensors.get("shared.weight")):
            raise UserError(f"{path}: {key} differs from shared.weight; t5lite's stacks share one input embedding")
    cfg = config_from_hf(hf_cfg, separate_head)
    if not cfg.logits_via_embedding and lm_head is None:
        # Unscaled logits through the shared embedding: an untied head that starts equal to it.
        tensors["lm_head.weight"] = tensors.get("shared.weight")
    return cfg, _read_params(path, cfg, tensors)


def _read_params(path: str, cfg: T5Config, tensors: dict) -> dict:
    """The t5lite params of `cfg` from a checkpoint's tensors, every name and shape checked."""
    expected = param_shapes(abstract_params(cfg))
    flat = {}
    for ours, theirs, to_t5, _ in parameter_map(cfg):
        keys = (theirs,) if isinstance(theirs, str) else theirs
        for key in keys:
            if tensors.get(key) is None:
                raise UserError(f"{path}: tensor {key!r} is missing; the checkpoint does not match its config.json")
        parts = [to_t5(np.asarray(tensors[key], np.float32)) for key in keys]
        value = parts[0] if isinstance(theirs, str) else np.stack(parts)  # experts: [E, ...]
        if list(value.shape) != expected[ours]:
            raise UserError(f"{path}: tensor {keys[0]!r} has shape {tuple(tensors[keys[0]].shape)}, which does not "
                            f"match config.json (t5lite expects {tuple(expected[ours])} for {ours})")
        flat[ours] = np.ascontiguousarray(value)
    return nest_paths(flat)


# Ablation fields and the only value of each that HF's T5 family has.
_HF_T5_ARCHITECTURE = dict(position_scheme="t5_relative_bias", attention="multi_head", qk_norm=False,
                           attention_logit_softcap=None, norm="rms_norm", norm_layout="pre", sliding_window=None,
                           final_logit_softcap=None, query_pre_attn_scalar=None, embedding_scale=False,
                           separate_embeddings=False, decoder_start_token_id=0)


def check_hf_representable(cfg: T5Config) -> None:
    """One-line UserError naming every setting of `cfg` that HF's T5 / UMT5 / Switch / T5Gemma cannot represent."""
    if t5gemma.is_t5gemma(cfg):
        unsupported = t5gemma.unsupported(cfg)
        if unsupported:
            raise UserError(f"HF transformers' T5Gemma cannot represent {', '.join(unsupported)}; set those as "
                            "experiments/models/t5gemma_*.gin do")
        return
    unsupported = [f"{name}={getattr(cfg, name)!r}" for name, value in _HF_T5_ARCHITECTURE.items()
                   if getattr(cfg, name) != value]
    if cfg.kv_heads != cfg.num_heads:
        unsupported.append(f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention)")
    if cfg.mlp_activations not in _ACTIVATIONS_TO_HF:
        unsupported.append(f"mlp_activations={cfg.mlp_activations}")
    if cfg.mlp not in ("dense", "moe"):
        unsupported.append(f"mlp={cfg.mlp!r}")
    if longt5.is_longt5(cfg):
        unsupported += longt5.unsupported(cfg)
    elif cfg.encoder_attention not in (None, "multi_head"):
        unsupported.append(f"encoder_attention={cfg.encoder_attention!r}")
    if cfg.mlp == "moe" and not longt5.is_longt5(cfg):
        unsupported += _switch_unsupported(cfg)
    if cfg.logits_via_embedding and not cfg.scale_tied_logits:
        unsupported.append("scale_tied_logits=False (tied logits unscaled)")
    if unsupported:
        raise UserError(f"HF transformers' {_FAMILY_NAMES[family(cfg)]} cannot represent {', '.join(unsupported)}; "
                        "only T5's architecture (relative position bias, multi-head attention, pre-RMSNorm), with "
                        "Switch's top-1 MoE, UMT5's per-layer bias or LongT5's encoder attention, converts")


def _switch_unsupported(cfg: T5Config) -> List[str]:
    out = []
    if cfg.relative_attention_per_layer:
        out.append("relative_attention_per_layer=True with mlp='moe'")
    if len(cfg.mlp_activations) != 1:
        out.append(f"gated MoE activations {cfg.mlp_activations}")
    if cfg.experts_per_token != 1:
        out.append(f"experts_per_token={cfg.experts_per_token} (Switch routes top-1)")
    if cfg.expert_capacity is None:
        out.append("expert_capacity=None (Switch needs a fixed number of slots per expert)")
    for layers in (cfg.num_encoder_layers, cfg.num_decoder_layers):
        sparse = layers // cfg.moe_every
        if sparse == 0 or layers // sparse != cfg.moe_every:
            out.append(f"moe_every={cfg.moe_every} with {layers} layers")
    if cfg.mlp_of_layer(1 % cfg.moe_every) != "moe":
        out.append(f"moe_first_layer={cfg.moe_first_layer} (Switch's MoE layers are i % moe_every == 1)")
    return sorted(set(out))


def config_to_hf(cfg: T5Config) -> dict:
    """An HF config.json dict that transformers 4 and 5 read as this architecture."""
    check_hf_representable(cfg)
    model_type = family(cfg)
    if model_type == "t5gemma":
        return t5gemma.config_to_hf(cfg)
    out = {
        "architectures": [MODEL_CLASSES[model_type]], "model_type": model_type, "is_encoder_decoder": True,
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
    if model_type == "switch_transformers":
        out.update(dense_act_fn=out.pop("feed_forward_proj"), num_experts=cfg.num_experts,
                   num_sparse_encoder_layers=cfg.num_encoder_layers // cfg.moe_every,
                   num_sparse_decoder_layers=cfg.num_decoder_layers // cfg.moe_every,
                   expert_capacity=cfg.expert_capacity, router_bias=False, router_dtype="float32",
                   router_jitter_noise=cfg.router_jitter_noise, router_aux_loss_coef=cfg.moe_load_balancing_weight,
                   router_z_loss_coef=cfg.moe_router_z_loss_weight)
    if model_type == longt5.MODEL_TYPE:
        out.update(longt5.hf_config_fields(cfg))
    return out


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
    """Writes `path/config.json` + `path/model.safetensors` for <family>ForConditionalGeneration.from_pretrained,
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
        value = np.asarray(flat[ours], np.float32)
        for key, part in ([(theirs, value)] if isinstance(theirs, str) else zip(theirs, value)):  # experts: [E, ...]
            tensors[key] = np.ascontiguousarray(to_hf_fn(part))

    if hf_cfg["model_type"] == "switch_transformers":
        # transformers 5 unties Switch's stack embeddings from shared.weight when tie_word_embeddings is false.
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            tensors[key] = tensors["shared.weight"].copy()
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
