"""Model variants: every position scheme and attention setting decodes on its KV cache exactly like the
full forward pass and packs exactly like unpacked rows; the default is today's model; configs validate."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.infer import generate
from t5lite.model import (DecoderOnly, EncoderDecoder, T5Config, abstract_params, get_config, init_params,
                          param_shapes, scan_params, unscan_params)

SCHEMES = ("t5_relative_bias", "absolute_learned", "sinusoidal", "rope", "alibi", "none")
# Every position scheme under grouped-query attention with QK-norm and logit soft-capping (two of them also
# with the other norm layouts); then multi-head and multi-query attention, partial rotary, and a top-2 MoE.
_GQA = dict(num_kv_heads=2, qk_norm=True, attention_logit_softcap=5.0)
VARIANTS = {
    **{scheme: dict(position_scheme=scheme, **_GQA) for scheme in SCHEMES},
    "sinusoidal": dict(position_scheme="sinusoidal", norm_layout="sandwich", **_GQA),
    "alibi": dict(position_scheme="alibi", norm="layer_norm", norm_layout="post", **_GQA),
    "rope+mha": dict(position_scheme="rope"),
    "absolute_learned+mha": dict(position_scheme="absolute_learned"),
    "rope_half+mqa": dict(position_scheme="rope", rope_fraction=0.5, num_kv_heads=1),
    "moe_top2_every2": dict(mlp="moe", num_experts=4, experts_per_token=2, moe_every=2),
}
FAST = ("rope", "moe_top2_every2")  # the rest run with the slow tests


def _random_rows(rng, n_rows, enc_len, dec_len):
    enc = np.zeros((n_rows, enc_len), np.int32)
    for i in range(n_rows):
        n = rng.integers(3, enc_len + 1)
        enc[i, :n - 1], enc[i, n - 1] = rng.integers(2, 500, n - 1), 1
    dec = np.concatenate([np.zeros((n_rows, 1), np.int32), rng.integers(2, 500, (n_rows, dec_len - 1))], axis=1)
    return enc, dec


def _pad(x, n):
    return np.pad(np.asarray(x), (0, n - len(x)))


def _row(examples, enc_len=16, dec_len=12):
    """Examples [(inputs, targets)] packed into one row with segment ids and positions (one example: unpacked)."""
    shifted = [np.concatenate([[0], t[:-1]]) for _, t in examples]
    segments = lambda lens: np.repeat(np.arange(1, len(lens) + 1), lens)  # noqa: E731
    in_lens, tg_lens = [len(i) for i, _ in examples], [len(t) for _, t in examples]
    row = dict(encoder_input_tokens=np.concatenate([i for i, _ in examples]),
               encoder_segment_ids=segments(in_lens), encoder_positions=np.concatenate([np.arange(n) for n in in_lens]),
               decoder_input_tokens=np.concatenate(shifted),
               decoder_target_tokens=np.concatenate([t for _, t in examples]),
               decoder_segment_ids=segments(tg_lens), decoder_positions=np.concatenate([np.arange(n) for n in tg_lens]))
    return {k: _pad(v, enc_len if k.startswith("encoder") else dec_len)[None].astype(np.int32) for k, v in row.items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in VARIANTS])
def test_cached_decoding_and_packing_equal_the_full_forward_pass(name):
    """(1) Decoding one token at a time on the KV cache gives the full forward pass's logits;
    (2) two examples packed in one row (segments, positions restarting at 0) give the logits of each alone."""
    cfg = get_config("tiny", **VARIANTS[name])
    params = init_params(cfg, jax.random.key(0))
    model = EncoderDecoder(cfg)
    forward = jax.jit(lambda p, batch: model.apply({"params": p}, **batch))
    rng = np.random.default_rng(0)

    examples = [(rng.integers(2, 500, 6), rng.integers(2, 500, 4)), (rng.integers(2, 500, 8), rng.integers(2, 500, 5))]
    packed = forward(params, _row(examples))[0]
    np.testing.assert_allclose(packed[:4], forward(params, _row(examples[:1]))[0, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[4:9], forward(params, _row(examples[1:]))[0, :5], rtol=1e-5, atol=1e-5)

    one = _row([(rng.integers(2, 500, 11), rng.integers(2, 500, 12))])
    enc, dec = one["encoder_input_tokens"], one["decoder_input_tokens"]
    full = forward(params, one)  # [1, 12, V]

    @jax.jit
    def decode_all(p):
        encoded = model.apply({"params": p}, enc, method=model.encode)
        _, variables = model.apply({"params": p}, encoded, enc, dec[:, :1], decode=True, max_decode_length=12,
                                   method=model.decode, mutable=["cache"])

        def step(cache, t):
            token = jax.lax.dynamic_slice_in_dim(dec, t, 1, axis=1)
            logits, variables = model.apply({"params": p, "cache": cache}, None, enc, token, decode=True,
                                            decode_position=t, max_decode_length=12, method=model.decode,
                                            mutable=["cache"])
            return variables["cache"], logits[:, 0]

        return jax.lax.scan(step, variables["cache"], jnp.arange(12))[1]  # [12, 1, V]

    stepped = np.swapaxes(np.asarray(decode_all(params)), 0, 1)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("scheme", ["absolute_learned", pytest.param("rope", marks=pytest.mark.slow)])
def test_decoder_only_prompts_with_left_padding_decode_like_the_full_forward(scheme):
    """Prompt tokens sit after their row's left padding in the cache: their positions must still start at 0."""
    cfg = get_config("tiny", position_scheme=scheme, num_kv_heads=2)
    params = init_params(cfg, jax.random.key(3), decoder_only=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    tokens, _ = generate(cfg, params, np.array([p + [0] * (5 - len(p)) for p in prompts]), max_decode_length=5,
                         decoder_only=True)
    forward = jax.jit(lambda x: DecoderOnly(cfg).apply({"params": params}, x))
    for row, prompt in enumerate(prompts):
        seq = [0] + prompt
        for t in range(5):  # the whole sequence again each step: no cache, positions 0..len-1
            logits = forward(np.array([seq + [0] * (11 - len(seq))]))[0, len(seq) - 1]
            seq.append(int(np.argmax(logits)))
            assert seq[-1] == int(tokens[row, t]), (row, t)
            if seq[-1] == 1:
                break


@pytest.mark.slow
def test_beam_search_scores_are_the_models_log_probs_on_a_scanned_multi_query_cache():
    """Beam search reorders the cache between steps (here one kv head, scanned in blocks of a dense and an
    MoE layer); a wrong reorder changes the scores."""
    cfg = get_config("tiny", position_scheme="rope", num_kv_heads=1, mlp="moe", num_experts=4, moe_every=2,
                     scan_layers=True)
    params = scan_params(init_params(cfg.replace(scan_layers=False), jax.random.key(0)), cfg.layers_per_scan_block)
    enc = np.array([[5, 6, 7, 1], [8, 9, 1, 0]])
    tokens, scores = generate(cfg, params, enc, max_decode_length=6, method="beam", num_beams=3, length_penalty=0.0)
    tokens = np.asarray(tokens)
    dec = np.concatenate([np.zeros((2, 1), np.int32), tokens[:, :-1]], axis=1)
    log_probs = jax.nn.log_softmax(EncoderDecoder(cfg).apply({"params": params}, enc, dec))
    picked = np.take_along_axis(np.asarray(log_probs), tokens[..., None], -1)[..., 0]
    valid = np.cumsum(np.cumsum(tokens == 1, 1), 1) <= 1  # up to and including EOS
    np.testing.assert_allclose(scores, (picked * valid).sum(1), rtol=1e-4)


# --- The default is today's model ------------------------------------------------------------------


def test_num_kv_heads_equal_to_num_heads_is_todays_model():
    base = get_config("tiny")
    explicit = base.replace(num_kv_heads=base.num_heads)
    assert param_shapes(abstract_params(explicit)) == param_shapes(abstract_params(base))
    params = init_params(base, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(init_params(explicit, jax.random.key(0))), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    enc, dec = _random_rows(np.random.default_rng(2), 2, 7, 5)
    forward = lambda cfg: jax.jit(lambda p: EncoderDecoder(cfg).apply({"params": p}, enc, dec))(params)  # noqa: E731
    np.testing.assert_array_equal(forward(explicit), forward(base))


def test_grouped_query_attention_sizes_projections_and_cache():
    cfg = get_config("tiny", num_kv_heads=2)  # 4 query heads, 2 key/value heads of 16 dims
    shapes = param_shapes(abstract_params(cfg))
    assert shapes["encoder/layers_0/attention/query/kernel"] == [64, 4 * 16]  # [embed, heads x head_dim]
    assert shapes["encoder/layers_0/attention/key/kernel"] == [64, 2 * 16]
    assert shapes["decoder/layers_1/encoder_decoder_attention/value/kernel"] == [64, 2 * 16]
    model = EncoderDecoder(cfg)
    params = nn.meta.unbox(abstract_params(cfg))
    encoded = jax.ShapeDtypeStruct((1, 3, 64), jnp.float32)
    enc, start = jax.ShapeDtypeStruct((1, 3), jnp.int32), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    _, variables = jax.eval_shape(lambda p, e, x, s: model.apply(
        {"params": p}, e, x, s, decode=True, max_decode_length=10, method=model.decode, mutable=["cache"]),
        params, encoded, enc, start)
    cache = variables["cache"]["decoder"]["layers_0"]
    assert cache["self_attention"]["cached_key"].shape == (1, 2, 10, 16)  # heads first: [B, Hkv, L, Dh]
    assert cache["encoder_decoder_attention"]["cross_key"].shape == (1, 2, 3, 16)


def test_grouped_query_equals_multi_head_with_repeated_key_value_heads():
    """GQA is MHA whose k/v heads are copies: repeat each kv head over its query group and compare."""
    gqa = get_config("tiny", num_kv_heads=2)
    params = init_params(gqa, jax.random.key(4))
    repeat_heads = lambda x: jnp.repeat(x.reshape(x.shape[0], 2, -1), 2, axis=1).reshape(x.shape[0], -1)  # noqa: E731
    mha_params = jax.tree_util.tree_map_with_path(  # kernels [embed, kv_heads x head_dim]
        lambda path, x: repeat_heads(x) if path[-2].key in ("key", "value") else x, params)
    enc, dec = _random_rows(np.random.default_rng(3), 2, 7, 5)
    forward = lambda cfg, p: jax.jit(lambda p: EncoderDecoder(cfg).apply({"params": p}, enc, dec))(p)  # noqa: E731
    np.testing.assert_allclose(forward(gqa, params), forward(get_config("tiny"), mha_params), rtol=1e-5, atol=1e-5)


# --- Layouts, scan, remat ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["absolute_learned", "rope_half+mqa", "alibi", "moe_top2_every2"])
def test_every_parameter_of_a_variant_has_logical_axes(name):
    cfg = get_config("tiny", **VARIANTS[name], scan_layers=True)
    boxed = abstract_params(cfg)
    shapes = param_shapes(boxed)
    flat = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed),
                                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    assert len(flat) == len(shapes)
    for path, spec in flat:
        key = "/".join(k.key for k in path)
        assert len(spec) == len(shapes[key]) and all(isinstance(a, str) for a in spec), (key, spec)
        assert spec[0] == "layers" if "/layers/" in key else "layers" not in spec
        if "/expert/" in key:
            assert spec[1] == "expert"
        if key.endswith(("/key/kernel", "/value/kernel")):
            assert tuple(spec)[-2:] == ("embed", "kv_heads")  # joined [embed, kv_heads x kv]


def test_norm_layouts_name_their_norms_like_t5x():
    def norms(**kw):
        return sorted(k.split("/")[2] for k in param_shapes(abstract_params(get_config("tiny", **kw)))
                      if k.startswith("encoder/layers_0/") and "norm" in k)
    assert norms() == ["pre_attention_layer_norm", "pre_mlp_layer_norm"]
    assert norms(norm_layout="post") == ["post_attention_layer_norm", "post_mlp_layer_norm"]
    assert norms(norm_layout="sandwich") == ["post_attention_layer_norm", "post_mlp_layer_norm",
                                             "pre_attention_layer_norm", "pre_mlp_layer_norm"]
    shapes = param_shapes(abstract_params(get_config("tiny", norm="layer_norm", norm_layout="post", qk_norm=True)))
    assert "encoder/encoder_norm/scale" not in shapes  # post-norm layers already end normalised
    assert shapes["encoder/layers_0/post_mlp_layer_norm/bias"] == [64]
    assert shapes["decoder/layers_0/self_attention/query_norm/scale"] == [16]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(position_scheme="rope", num_kv_heads=2, qk_norm=True),
                                       dict(mlp="moe", num_experts=4, moe_every=2, norm_layout="sandwich")],
                         ids=["modern", "moe_every_2"])
def test_scanned_variants_equal_unscanned(overrides):
    """Same loss and gradients scanned (in blocks of moe_every layers, with remat) and unrolled."""
    cfg = get_config("tiny", **overrides)
    params = init_params(cfg, jax.random.key(0))
    scanned_cfg = cfg.replace(scan_layers=True, remat_policy="full")
    scanned = scan_params(params, scanned_cfg.layers_per_scan_block)
    assert param_shapes(scanned) == param_shapes(abstract_params(scanned_cfg))
    for a, b in zip(jax.tree.leaves(unscan_params(scanned)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    enc, dec = _random_rows(np.random.default_rng(4), 2, 7, 5)
    loss_and_grads = lambda c, p: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: EncoderDecoder(c).apply({"params": p}, enc, dec).std()))(p)
    (scanned_loss, scanned_grads), (loss, grads) = loss_and_grads(scanned_cfg, scanned), loss_and_grads(cfg, params)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unscan_params(scanned_grads)), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- The config -------------------------------------------------------------------------------------


def test_new_fields_keep_the_config_hashable_and_json_round_trippable():
    cfg = get_config("tiny", position_scheme="rope", num_kv_heads=2, qk_norm=True, attention_logit_softcap=30.0,
                     mlp="moe", moe_every=2)
    assert hash(cfg) == hash(get_config("tiny", **{k: v for k, v in cfg.to_dict().items()}))
    assert T5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_config_saved_before_the_ablation_fields_loads_with_todays_defaults():
    old = get_config("t5_1_1_small").to_dict()
    for name in ("position_scheme", "rope_theta", "rope_fraction", "max_position_embeddings", "attention",
                 "num_kv_heads", "qk_norm", "attention_logit_softcap", "norm", "norm_layout", "mlp", "moe_every",
                 "num_experts", "experts_per_token", "expert_capacity_factor", "eval_expert_capacity_factor",
                 "moe_load_balancing_weight", "moe_router_z_loss_weight"):
        del old[name]
    assert T5Config.from_dict(old) == get_config("t5_1_1_small")


@pytest.mark.parametrize("overrides, message", [
    (dict(position_scheme="xpos"), "unknown positions 'xpos'; choose from .*rope"),
    (dict(attention="flash"), "unknown attention 'flash'; choose from multi_head"),
    (dict(mlp="sparse"), "unknown mlp 'sparse'; choose from dense, moe"),
    (dict(norm="batch_norm"), "unknown norm 'batch_norm'; choose from rms_norm, layer_norm"),
    (dict(norm_layout="middle"), "choose from pre, post, sandwich"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(rope_fraction=0.0), "rope_fraction"),
    (dict(attention_logit_softcap=-1.0), "softcap"),
    (dict(experts_per_token=9), "exceeds num_experts"),
    (dict(mlp="moe", moe_every=3, scan_layers=True), "moe_every=3 .* must divide"),
])
def test_invalid_variant_values_fail_in_one_line_naming_the_choices(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        get_config("tiny", **overrides)
    assert "\n" not in str(error.value)


# --- HF conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, named", [
    (dict(position_scheme="rope"), "position_scheme='rope'"),
    (dict(num_kv_heads=2), "num_kv_heads=2"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(attention_logit_softcap=50.0), "attention_logit_softcap=50.0"),
    (dict(norm="layer_norm"), "norm='layer_norm'"),
    (dict(norm_layout="sandwich"), "norm_layout='sandwich'"),
    (dict(mlp="moe"), "expert_capacity=None"),  # an MoE converts as Switch Transformers when HF's Switch holds it
    (dict(position_scheme="alibi", num_kv_heads=1), "position_scheme='alibi', num_kv_heads=1"),
])
def test_hf_conversion_refuses_what_hf_t5_cannot_represent(tmp_path, overrides, named):
    from t5lite.convert.hf import to_hf
    cfg = get_config("tiny", **overrides)
    family = "Switch Transformers" if overrides.get("mlp") == "moe" else "T5"
    with pytest.raises(UserError, match=f"HF transformers' {family} cannot represent " + named.replace("(", r"\(")) as error:
        to_hf(cfg, {}, str(tmp_path / "hf"))
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()
