"""UMT5 and Switch Transformers: logits, `to-hf` round trips, generate and routing against HF transformers.

The reference is HF's PyTorch model built from a random config, saved and converted, run in float64;
t5lite in float32 must be within max(1e-4, 2 x HF-float32's own error) relative to the largest logit.
transformers 5 forces UMT5's tie_word_embeddings to true and then scales the logits of untied checkpoints
by d_model**-0.5, which transformers 4 and the T5X originals do not: an untied UMT5 reference here is
run with that flag set back to false (t5lite/convert/hf.py).
"""

import os

import numpy as np
import pytest

from tests.hf_reference import (assert_logit_parity, assert_same_params, check_card_against_peft, hf_generate,
                                 hf_logits, normalise_generated, padded_prompts, random_batch, t5lite_logits)
from t5lite.convert.hf import from_hf, to_hf
from t5lite.infer import generate
from t5lite.model import init_params

import jax

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {  # odd sizes, several layers, unequal depths, buckets past the lengths below
    "umt5_tied_gated_gelu": ("umt5", dict(vocab_size=97, d_model=24, d_kv=5, num_heads=3, d_ff=37, num_layers=3,
                                          num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                          relative_attention_num_buckets=16, relative_attention_max_distance=20)),
    "umt5_untied_relu": ("umt5", dict(vocab_size=131, d_model=20, d_kv=6, num_heads=2, d_ff=33, num_layers=2,
                                      num_decoder_layers=3, feed_forward_proj="relu", untied=True)),
    # 4 experts, 5 slots each: the 23-token rows overflow some experts, so tokens are dropped.
    "switch_step2_tied": ("switch", dict(vocab_size=101, d_model=24, d_kv=6, num_heads=3, d_ff=40, num_layers=4,
                                         num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4,
                                         expert_capacity=5)),
    "switch_step3_untied": ("switch", dict(vocab_size=89, d_model=20, d_kv=4, num_heads=5, d_ff=27, num_layers=6,
                                           num_decoder_layers=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=3,
                                           expert_capacity=3, dense_act_fn="gelu_new", untied=True)),
}


def _classes(kind):
    if kind == "umt5":
        return transformers.UMT5Config, transformers.UMT5ForConditionalGeneration
    return transformers.SwitchTransformersConfig, transformers.SwitchTransformersForConditionalGeneration


def make_hf(path, kind, *, untied=False, seed=0, **config):
    """Saves a random HF model to `path`; returns a loader (float32 / float64) of it as HF reads it back."""
    config_cls, model_cls = _classes(kind)
    torch.manual_seed(seed)
    extra = dict(router_jitter_noise=0.0) if kind == "switch" else {}
    cfg = config_cls(dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=not untied, **extra, **config)
    model = model_cls(cfg)
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
        if kind == "switch":  # transformers 5 unties Switch's stack embeddings too; real checkpoints share one
            with torch.no_grad():
                for stack in (model.encoder, model.decoder):
                    stack.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(path)
    return lambda dtype=torch.float32: load_hf(path, kind, dtype)


def load_hf(path, kind, dtype=torch.float32):
    model = _classes(kind)[1].from_pretrained(path).eval().to(dtype)
    lm_head, shared = model.lm_head.weight, model.shared.weight
    if kind == "umt5" and not torch.equal(lm_head, shared):
        model.config.tie_word_embeddings = False  # the untied, unscaled model (module docstring)
    return model


def _case(name, tmp_path):
    kind, spec = CASES[name]
    spec = dict(spec)
    untied = spec.pop("untied", False)
    return kind, make_hf(tmp_path / "hf", kind, untied=untied, **spec), untied


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_hf_logits_match(name, tmp_path):
    kind, load, untied = _case(name, tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    assert cfg.logits_via_embedding == (not untied)
    assert cfg.relative_attention_per_layer == (kind == "umt5")
    assert cfg.mlp == ("moe" if kind == "switch" else "dense")
    rng = np.random.default_rng(0)
    enc, dec_in, targets = random_batch(rng, cfg.vocab_size, [23, 9, 4], [13, 5, 1], 23, 13)
    assert_logit_parity(t5lite_logits(cfg, params, enc, dec_in, targets), load, enc, dec_in, targets)


@pytest.mark.parametrize("name", ["umt5_untied_relu", "switch_step2_tied", "switch_step3_untied"])
def test_round_trip_through_hf_is_exact(name, tmp_path):
    """t5lite's own random params -> to_hf -> HF logits equal t5lite's -> from_hf gives them back bit for bit."""
    kind, _, _ = _case(name, tmp_path)
    cfg, _ = from_hf(str(tmp_path / "hf"))
    params = init_params(cfg, jax.random.key(3))
    to_hf(cfg, params, str(tmp_path / "out"))
    enc, dec_in, targets = random_batch(np.random.default_rng(1), cfg.vocab_size, [17, 6], [9, 4], 17, 9)
    ours = t5lite_logits(cfg, params, enc, dec_in, targets)
    assert_logit_parity(ours, lambda dtype: load_hf(str(tmp_path / "out"), kind, dtype), enc, dec_in, targets)
    cfg2, params2 = from_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    assert_same_params(params, params2)


# --- generate -----------------------------------------------------------------------------------

GEN = {  # a small vocabulary and larger weights so that EOS and varied tokens come out
    "umt5": dict(vocab_size=24, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=3,  # equal: HF generate needs it
                 feed_forward_proj="gated-gelu", initializer_factor=2.0, untied=True),
    "switch": dict(vocab_size=24, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=4, num_decoder_layers=4,
                   num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=3, initializer_factor=2.0,
                   untied=True),
}


@pytest.mark.slow  # 30-40 s each on 2 cores (two decoders compiled per framework); in make test, not test-fast
@pytest.mark.parametrize("kind", sorted(GEN))
def test_greedy_and_beam_match_hf_generate(kind, tmp_path):
    spec = dict(GEN[kind])
    untied = spec.pop("untied")
    make_hf(tmp_path / "hf", kind, untied=untied, seed=5, **spec)
    hf = load_hf(str(tmp_path / "hf"), kind)
    cfg, params = from_hf(str(tmp_path / "hf"))
    enc = padded_prompts(24)

    ref, _ = hf_generate(hf, enc, num_beams=1)
    ours, _ = generate(cfg, params, enc, max_decode_length=12)
    assert (np.asarray(ours) > 1).sum() > 15  # not trivially empty outputs
    np.testing.assert_array_equal(normalise_generated(np.asarray(ours), 12), normalise_generated(ref, 12))

    ref, out = hf_generate(hf, enc, num_beams=3, length_penalty=0.6, early_stopping=True)
    ours, scores = generate(cfg, params, enc, max_decode_length=12, method="beam", num_beams=3, length_penalty=0.6)
    np.testing.assert_array_equal(normalise_generated(np.asarray(ours), 12), normalise_generated(ref, 12))
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-4)


# --- presets: parameter counts equal HF's models of the same config.json (built on the meta device) ---

FAMILY_PRESETS = ["umt5_small", "umt5_base", "umt5_xl", "umt5_xxl", "switch_base_8", "switch_base_16",
                  "switch_base_32", "switch_base_64", "switch_base_128", "switch_large_128"]


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_preset_parameter_counts_equal_hf(name):
    from t5lite.convert.hf import config_to_hf
    from t5lite.model import abstract_params, count_params, get_config

    cfg = get_config(name)
    hf_cfg = config_to_hf(cfg)  # also checks that to-hf can write the preset
    kind = "umt5" if hf_cfg["model_type"] == "umt5" else "switch"
    config_cls, model_cls = _classes(kind)
    with torch.device("meta"):  # shapes only: xxl's 13B weights are never allocated
        model = model_cls(config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}))
    count = sum(p.numel() for p in model.parameters())  # tied tensors once
    if model.lm_head.weight is model.shared.weight and not cfg.logits_via_embedding:
        count += model.lm_head.weight.numel()  # transformers 5 ties UMT5's head in memory; the checkpoints do not
    assert count_params(abstract_params(cfg)) == count


# --- Switch routing, by hand -------------------------------------------------------------------


def test_switch_router_matches_hf_on_a_hand_checked_row():
    """One row of 5 tokens, 2 experts of 2 slots. The router's logits are the tokens themselves, so tokens
    0, 1, 2 and 4 choose expert 0 and token 3 expert 1; expert 0 is full after tokens 0 and 1, so 2 and 4
    are dropped (zero MLP output: the residual carries them). Experts: relu(x) and relu(2x)."""
    from t5lite.model import T5Config
    from t5lite.model.moe import MoeMlp, dispatch_and_combine

    x = np.array([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0]]], np.float32)  # [1, 5, 2]
    eye = np.eye(2, dtype=np.float32)
    p = lambda a, b: np.exp(a) / (np.exp(a) + np.exp(b))  # noqa: E731
    expected = np.array([[p(3, 0) * 3, 0], [p(2, 0) * 2, 0], [0, 0], [0, p(2, 0) * 4], [0, 0]], np.float32)

    hf_cfg = transformers.SwitchTransformersConfig(d_model=2, d_ff=2, num_experts=2, expert_capacity=2,
                                                   router_jitter_noise=0.0, dense_act_fn="relu", dropout_rate=0.0)
    hf = transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersSparseMLP(hf_cfg)
    with torch.no_grad():
        hf.router.classifier.weight.copy_(torch.tensor(eye))
        for e, scale in enumerate((1.0, 2.0)):
            hf.experts[f"expert_{e}"].wi.weight.copy_(torch.tensor(scale * eye))
            hf.experts[f"expert_{e}"].wo.weight.copy_(torch.tensor(eye))
        hf_index, hf_probs, hf_logits_ = hf.router(torch.tensor(x))
        hf_out = hf(torch.tensor(x)).numpy()
    np.testing.assert_allclose(hf_out[0], expected, rtol=1e-6)  # the hand-checked values hold for HF

    cfg = T5Config(emb_dim=2, mlp_dim=2, mlp_activations=("relu",), mlp="moe", num_experts=2, expert_capacity=2)
    params = {"router": {"kernel": eye}, "expert": {"wi": {"kernel": np.stack([eye, 2 * eye])},
                                                    "wo": {"kernel": np.stack([eye, eye])}}}
    out, state = MoeMlp(cfg).apply({"params": params}, x, True, capture_intermediates=True, mutable=["aux_loss"])
    logits = np.asarray(state["intermediates"]["router"]["__call__"][0])  # t5lite's router logits [1, 5, E]
    out = np.asarray(out)
    np.testing.assert_allclose(out, hf_out, rtol=1e-6, atol=1e-7)  # outputs, dropped tokens included
    assert not out[0, 2].any() and not out[0, 4].any()

    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(hf_logits_.numpy(), logits, rtol=1e-6)
    np.testing.assert_allclose(hf_probs.numpy()[..., 0], probs.max(-1), rtol=1e-6)  # the gate: top probability
    expert = np.argmax(probs, -1)[..., None]  # [1, 5, 1]
    dispatch, _ = dispatch_and_combine(jax.numpy.asarray(expert), jax.numpy.asarray(probs.max(-1, keepdims=True)),
                                       2, 2)  # [1, 5, E, C]
    np.testing.assert_array_equal(np.asarray(dispatch).sum(-1), hf_index.numpy())  # kept (token, expert) pairs
    np.testing.assert_array_equal(hf_index.numpy()[0], [[1, 0], [1, 0], [0, 0], [0, 1], [0, 0]])


@pytest.mark.parametrize("overrides,message", [
    (dict(experts_per_token=2), "experts_per_token=2"),
    (dict(expert_capacity=None), "expert_capacity=None"),
    (dict(moe_first_layer=0), "moe_first_layer=0"),
    (dict(relative_attention_per_layer=True), "relative_attention_per_layer=True with mlp='moe'"),
])
def test_to_hf_refuses_what_switch_cannot_represent_in_one_line(overrides, message, tmp_path):
    from t5lite.errors import UserError
    from t5lite.model import get_config

    cfg = get_config("tiny", mlp="moe", mlp_activations=("relu",), moe_every=2, moe_first_layer=1, num_experts=2,
                     expert_capacity=4).replace(**overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        to_hf(cfg, init_params(cfg, jax.random.key(0)), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_file,extra", [("umt5_small", ["--gin.T5Config.scan_layers=True"]),
                                              ("switch_base_8", [])])
def test_train_two_steps_from_the_cli(model_file, extra, tmp_path):
    """`t5lite train` with the family's models/ gin file (shrunk by tiny.gin, which keeps the family's fields)."""
    import json
    from t5lite.cli import main

    model_dir = tmp_path / "run"
    assert main(["train", "--gin_file=experiments/demo/pretrain.gin", f"--gin_file=experiments/models/{model_file}.gin",
                 "--gin_file=experiments/models/tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                 "--gin.TRAIN_STEPS=2", "--gin.train.log_period=1", "--gin.train.progress='off'",
                 f"--model_dir={model_dir}", *extra]) == 0
    saved = (model_dir / "config.gin").read_text()
    family_lines = (["T5Config.relative_attention_per_layer = True"] if model_file.startswith("umt5")
                    else ["T5Config.mlp = 'moe'", "T5Config.moe_first_layer = 1", "T5Config.expert_capacity = 64"])
    assert all(line in saved for line in family_lines)
    losses = [json.loads(line)["loss"] for line in open(model_dir / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("overrides", [dict(relative_attention_per_layer=True),
                                       dict(mlp="moe", mlp_activations=("relu",), moe_every=2, moe_first_layer=1,
                                            num_experts=3, expert_capacity=3)], ids=["umt5", "switch"])
def test_lora_card_on_the_family(overrides):
    """A fresh LoRA card leaves a tiny UMT5 / Switch bit-identical; a trained one changes its logits."""
    from t5lite.model import get_config, lora
    from tests.test_lora import _card, _logits, _params

    config = get_config("tiny", **overrides)
    spec = lora.LoraConfig(rank=2, targets=("q", "v", "wi", "wo"))
    params = _params(config)
    fresh = jax.jit(lambda k: lora.init_card(config, spec, k))(jax.random.key(1))
    base = _logits(config, params)
    np.testing.assert_array_equal(_logits(config, params, fresh, spec), base)
    assert np.abs(_logits(config, params, _card(config, spec, 2), spec) - base).max() > 1e-3


@pytest.mark.parametrize("overrides", [
    dict(mlp="moe", mlp_activations=("relu",), moe_every=2, moe_first_layer=1, num_experts=3, expert_capacity=3,
         num_encoder_layers=4, num_decoder_layers=4),
    dict(relative_attention_per_layer=True, num_encoder_layers=3, num_decoder_layers=3)], ids=["switch", "umt5"])
def test_scanned_layout_gives_the_same_logits_and_converts(overrides, tmp_path):
    """scan_layers stacks Switch's (dense, MoE) blocks and UMT5's per-layer tables; to-hf unstacks them exactly."""
    from t5lite.model import get_config, scan_params

    cfg = get_config("tiny", **overrides)
    params = init_params(cfg, jax.random.key(0))
    scanned_cfg = cfg.replace(scan_layers=True)
    scanned = scan_params(params, scanned_cfg.layers_per_scan_block)
    enc, dec_in, targets = random_batch(np.random.default_rng(2), cfg.vocab_size, [12, 5], [4, 2], 12, 4)
    np.testing.assert_allclose(t5lite_logits(scanned_cfg, scanned, enc, dec_in, targets), t5lite_logits(cfg, params, enc, dec_in, targets),
                               atol=1e-5)
    to_hf(scanned_cfg, scanned, str(tmp_path / "out"))
    cfg2, params2 = from_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("name", ["umt5_untied_relu", "switch_step2_tied"])
def test_peft_export_of_a_card_gives_hf_peft_the_same_logits(name, tmp_path):
    """A LoRA card on a converted UMT5 / Switch base exports to PEFT; PEFT on HF's model gives t5lite's logits."""
    kind, load, _ = _case(name, tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    batch = random_batch(np.random.default_rng(0), cfg.vocab_size, [11, 4], [7, 2], 11, 7)
    check_card_against_peft(tmp_path, cfg, params, lambda: load(torch.float32),
                            lambda model: hf_logits(model, batch[0], batch[1]), batch)
