"""T5Gemma: logits, `to-hf` round trip, generate, cached decoding past the window, PEFT and training vs HF.

The reference is HF's T5GemmaForConditionalGeneration built from a random config (every weight drawn
again so that norms, soft-caps and the window all matter), saved and converted, run in float64; t5lite
in float32 must be within max(1e-4, 2 x HF-float32's own error) relative to the largest logit. Inputs
are longer than the sliding window, so local and global layers differ.
"""

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.hf_reference import (assert_logit_parity, assert_same_params, check_card_against_peft, normalise_generated,
                                 padded_prompts, random_batch)
from t5lite.convert.hf import from_hf, to_hf
from t5lite.errors import UserError
from t5lite.infer import generate
from t5lite.model import EncoderDecoder, init_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {  # odd sizes, several layers, unequal depths, GQA and MQA, windows shorter than the inputs
    "gqa_tied_pattern2": dict(vocab_size=97, hidden_size=24, intermediate_size=37, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=6, query_pre_attn_scalar=10, sliding_window=3,
                              layers=(4, 3)),
    "mqa_untied_pattern3": dict(vocab_size=83, hidden_size=21, intermediate_size=29, num_attention_heads=3,
                                num_key_value_heads=1, head_dim=10, query_pre_attn_scalar=7, sliding_window=4,
                                layers=(3, 5), pattern=("sliding_attention", "sliding_attention", "full_attention"),
                                final_logit_softcapping=2.0, attn_logit_softcapping=3.0, rope_theta=500.0,
                                untied=True),
}


def make_hf(path, *, layers, untied=False, seed=0, pattern=None, rope_theta=10000.0, scale=0.3, **module):
    """Saves a random HF T5Gemma to `path`; returns a loader (float32 / float64) of it as HF reads it back."""
    torch.manual_seed(seed)
    subs = []
    for n in layers:
        types = None if pattern is None else [pattern[i % len(pattern)] for i in range(n)]
        subs.append(transformers.T5GemmaModuleConfig(
            num_hidden_layers=n, layer_types=types, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            **module))
    cfg = transformers.T5GemmaConfig(encoder=subs[0], decoder=subs[1], vocab_size=module["vocab_size"],
                                     tie_word_embeddings=not untied)
    model = transformers.T5GemmaForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initialises norms at 0 and weights at 0.02: draw everything again
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (scale if "norm" in name else scale / 2))
    model.save_pretrained(path)
    return lambda dtype=torch.float32: load_hf(path, dtype)


def load_hf(path, dtype=torch.float32):
    return transformers.T5GemmaForConditionalGeneration.from_pretrained(path).eval().to(dtype)


def hf_logits(model, enc, dec_in, targets):
    """HF's logits [B, T, V], run one example at a time without its padding: HF's eager attention gives NaN
    for a padding query whose whole window is padding, and the NaN reaches the real rows through
    cross-attention (0 x NaN). t5lite runs the padded batch."""
    out = np.zeros(dec_in.shape + (model.config.vocab_size,))
    for i in range(len(enc)):
        n, m = int((enc[i] > 0).sum()), int((targets[i] > 0).sum())
        dec = dec_in[i:i + 1, :m].copy()
        dec[:, 0] = model.config.decoder.bos_token_id  # HF starts at <bos>; t5lite feeds 0 and embeds it as <bos>
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(enc[i:i + 1, :n], dtype=torch.long),
                           decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits
        out[i, :m] = logits[0].double().numpy()
    return out


def _ours(cfg, params, enc, dec_in, targets):
    return np.asarray(jax.jit(lambda p: EncoderDecoder(cfg).apply({"params": p}, enc, dec_in,
                                                                   decoder_target_tokens=targets))(params))


def _assert_parity(ours, load, enc, dec_in, targets):
    """hf_reference's check, on this file's hf_logits (HF's T5Gemma takes each row unpadded, so it needs targets)."""
    return assert_logit_parity(ours, load, enc, dec_in, targets, lambda model: hf_logits(model, enc, dec_in, targets))


def _case(name, tmp_path):
    return make_hf(tmp_path / "hf", **CASES[name])


def _batch(vocab, seed=0):
    return random_batch(np.random.default_rng(seed), vocab, [23, 9, 4], [13, 5, 1], 23, 13)


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_hf_logits_match(name, tmp_path):
    load = _case(name, tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    spec = CASES[name]
    assert cfg.logits_via_embedding == (not spec.get("untied", False)) and cfg.separate_embeddings
    assert cfg.sliding_window == spec["sliding_window"] and cfg.decoder_start_token_id == 2
    assert cfg.sliding_window_pattern == (("local", "local", "global") if "pattern" in spec else ("local", "global"))
    enc, dec_in, targets = _batch(cfg.vocab_size)
    ours = _ours(cfg, params, enc, dec_in, targets)
    _assert_parity(ours, load, enc, dec_in, targets)
    if name != "gqa_tied_pattern2":
        return  # the checks below compile two more models: once is enough
    # The window matters here: the same weights with every layer global give other logits.
    wide = _ours(cfg.replace(sliding_window=None, sliding_window_pattern=("global",)), params, enc, dec_in, targets)
    assert np.abs(wide - ours)[targets > 0].max() > 1e-3 * np.abs(ours).max()
    # The blockwise core with blocks smaller than the window gives the same logits.
    blockwise = cfg.replace(attention_impl="blockwise", attention_block_q=4, attention_block_k=3)
    np.testing.assert_allclose(_ours(blockwise, params, enc, dec_in, targets), ours, atol=2e-5 * np.abs(ours).max())


def test_scan_layers_steps_over_blocks_of_the_window_pattern():
    """A (local, global) pattern scans in blocks of 2 layers, with the logits of the unrolled layers."""
    from t5lite.model import get_config, scan_params

    cfg = get_config("t5gemma_2b_2b", vocab_size=64, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24,
                     num_encoder_layers=4, num_decoder_layers=2, sliding_window=2)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(cfg, jax.random.key(0)))
    enc, dec_in, targets = random_batch(np.random.default_rng(2), 64, [12, 5], [6, 2], 12, 6)
    scanned = cfg.replace(scan_layers=True)
    assert scanned.layers_per_scan_block == 2
    plain = _ours(cfg, params, enc, dec_in, targets)
    np.testing.assert_allclose(_ours(scanned, scan_params(params, 2), enc, dec_in, targets), plain,
                               atol=2e-5 * np.abs(plain).max())
    with pytest.raises(UserError, match="blocks of 2 layers"):
        cfg.replace(scan_layers=True, num_decoder_layers=3)


def test_round_trip_through_hf_is_exact(tmp_path):
    """t5lite's own random params -> to_hf -> HF logits equal t5lite's -> from_hf gives them back bit for bit."""
    _case("mqa_untied_pattern3", tmp_path)
    cfg, _ = from_hf(str(tmp_path / "hf"))
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), params)  # norms != 0
    to_hf(cfg, params, str(tmp_path / "out"))
    enc, dec_in, targets = random_batch(np.random.default_rng(1), cfg.vocab_size, [17, 6], [9, 4], 17, 9)
    _assert_parity(_ours(cfg, params, enc, dec_in, targets), lambda dtype: load_hf(str(tmp_path / "out"), dtype),
                   enc, dec_in, targets)
    cfg2, params2 = from_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    assert_same_params(params, params2)


GEN = dict(vocab_size=24, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, query_pre_attn_scalar=8, sliding_window=3, layers=(3, 3), scale=0.6)


@pytest.mark.slow  # 10-35 s on 2 cores: HF generate, t5lite's decoder compiled twice
def test_greedy_generate_matches_hf_and_the_cache_matches_the_full_pass(tmp_path):
    """Greedy tokens equal HF generate's on a padded batch, 12 tokens with a window of 3; and the cached
    decoder's logits at every step equal one teacher-forced pass over the same tokens."""
    make_hf(tmp_path / "hf", seed=5, **GEN)
    hf = load_hf(str(tmp_path / "hf"))
    cfg, params = from_hf(str(tmp_path / "hf"))
    enc = padded_prompts(cfg.vocab_size, low=3)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0).long(),
                          max_new_tokens=12, do_sample=False).numpy()
    assert (ref[:, 0] == 2).all()  # HF starts from <bos>
    ours, _ = generate(cfg, params, enc, max_decode_length=12)
    ours = np.asarray(ours)
    assert (ours > 2).sum() > 15  # not trivially empty outputs
    np.testing.assert_array_equal(normalise_generated(ours, 12), normalise_generated(ref[:, 1:], 12))

    # Cached decoding, step by step, vs the full pass (windowed layers see the last 3 positions only).
    model, length = EncoderDecoder(cfg), 12
    dec_in = np.concatenate([np.zeros((len(enc), 1), np.int32), ours[:, :-1]], 1)
    full = np.asarray(jax.jit(lambda p: model.apply({"params": p}, enc, dec_in))(params))
    encoded = jax.jit(lambda p: model.apply({"params": p}, enc, method=model.encode))(params)
    _, cache = model.apply({"params": params}, encoded, enc, dec_in[:, :1], decode=True, max_decode_length=length,
                           method=model.decode, mutable=["cache"])
    step = jax.jit(lambda c, tok, pos: model.apply({"params": params, "cache": c}, encoded, enc, tok, decode=True,
                                                   decode_position=pos, max_decode_length=length, method=model.decode,
                                                   mutable=["cache"]))
    cache, steps = cache["cache"], []
    for t in range(length):
        logits, cache = step(cache, dec_in[:, t:t + 1], jnp.int32(t))
        cache = cache["cache"]
        steps.append(np.asarray(logits[:, 0]))
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5 * np.abs(full).max())
    layers = cache["decoder"]
    assert layers["layers_0"]["self_attention"]["cached_key"].shape[2] == 3  # local: a ring of window slots
    assert layers["layers_1"]["self_attention"]["cached_key"].shape[2] == length  # global: the whole sequence


@pytest.mark.parametrize("decoder_only", [False, True], ids=["beam", "decoder_only_prompts"])
def test_window_bounded_cache_decodes_as_the_full_length_cache(decoder_only, monkeypatch):
    """The ring cache of local layers gives the tokens and scores of a full-length masked cache: beam search
    (beams reorder the rings), and decoder-only prompts longer than the window (prefilled at once, left-padded)."""
    import t5lite.model.transformer as transformer
    from t5lite.model import get_config

    cfg = get_config("t5gemma_2b_2b", vocab_size=40, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                     mlp_dim=24, num_encoder_layers=2, num_decoder_layers=2, sliding_window=3,
                     logits_via_embedding=False)  # a random tied model repeats its input token
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(cfg, jax.random.key(0), decoder_only=decoder_only))
    prompts = padded_prompts(cfg.vocab_size, low=3)
    kwargs = dict(max_decode_length=9, decoder_only=decoder_only,
                  **({} if decoder_only else dict(method="beam", num_beams=3)))
    ring_tokens, ring_scores = generate(cfg, params, prompts, **kwargs)
    monkeypatch.setattr(transformer, "_ring_slots", lambda cfg, length: None)
    # Another (unused) block size: a new static config, so generate traces again instead of reusing its program.
    full_tokens, full_scores = generate(cfg.replace(attention_block_q=7), params, prompts, **kwargs)
    assert (np.asarray(full_tokens) > 2).sum() > 10
    np.testing.assert_array_equal(np.asarray(ring_tokens), np.asarray(full_tokens))
    np.testing.assert_allclose(np.asarray(ring_scores), np.asarray(full_scores), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 17-29 s: HF + PEFT and an adapted t5lite model
def test_peft_export_of_a_card_gives_hf_peft_the_same_logits(tmp_path):
    """A LoRA card on a converted T5Gemma base exports to PEFT; PEFT on HF's model gives t5lite's logits."""
    load = _case("gqa_tied_pattern2", tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    batch = random_batch(np.random.default_rng(0), cfg.vocab_size, [11, 4], [7, 2], 11, 7)
    check_card_against_peft(tmp_path, cfg, params, lambda: load(torch.float32),
                            lambda model: hf_logits(model, *batch), batch)


@pytest.mark.parametrize("change,message", [
    (lambda hf: hf["decoder"].update(hidden_size=16), "differ in hidden_size"),
    (lambda hf: hf.update(model_type="t5gemma2"), "T5Gemma 2"),
    (lambda hf: hf["decoder"].update(layer_types=["full_attention"] * 3), "different layer_types"),
])
def test_from_hf_refuses_what_t5lite_cannot_represent_in_one_line(change, message, tmp_path):
    import json
    _case("gqa_tied_pattern2", tmp_path)
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    change(hf)
    path.write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message) as err:
        from_hf(str(tmp_path / "hf"))
    assert "\n" not in str(err.value)


def test_to_hf_refuses_what_t5gemma_cannot_represent(tmp_path):
    from t5lite.model import get_config
    cfg = get_config("t5gemma_2b_2b").replace(vocab_size=64, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                                              mlp_dim=24, num_encoder_layers=2, num_decoder_layers=2, qk_norm=True)
    with pytest.raises(UserError, match="qk_norm=True") as err:
        to_hf(cfg, {}, str(tmp_path / "out"))  # refused before the params are read
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    plain = get_config("tiny", sliding_window=4, sliding_window_pattern=("local", "global"))
    with pytest.raises(UserError, match="sliding_window=4"):
        to_hf(plain, {}, str(tmp_path / "out2"))


# Parameter counts keras-hub publishes for these checkpoints (keras_hub/src/models/t5gemma/t5gemma_presets.py).
PUBLISHED = {"t5gemma_2b_2b": 5_596_853_760, "t5gemma_9b_9b": 20_333_401_088}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_equal_hf(name):
    from t5lite.convert.hf import config_to_hf
    from t5lite.model import abstract_params, count_params, get_config

    cfg = get_config(name)
    hf_cfg = config_to_hf(cfg)
    with torch.device("meta"):  # shapes only: 20B weights are never allocated
        model = transformers.T5GemmaForConditionalGeneration(transformers.T5GemmaConfig(
            **{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}))
    count = sum(p.numel() for p in model.parameters())  # the tied head once
    assert count_params(abstract_params(cfg)) == count == PUBLISHED[name]


@pytest.mark.slow  # 7-31 s: a whole `t5lite train` (compile, data, checkpoint)
def test_train_two_steps_from_the_cli(tmp_path):
    """`t5lite train` with the T5Gemma models/ gin file, shrunk by tiny.gin (which keeps the family's fields)."""
    import json
    from t5lite.cli import main

    model_dir = tmp_path / "run"
    assert main(["train", "--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/t5gemma_2b_2b.gin",
                 "--gin_file=experiments/models/tiny.gin", "--gin.T5Config.num_kv_heads=2",
                 "--gin.T5Config.query_pre_attn_scalar=16.0", "--gin.T5Config.sliding_window=8",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.TRAIN_STEPS=2",
                 "--gin.train.log_period=1", "--gin.train.progress='off'", f"--model_dir={model_dir}"]) == 0
    saved = (model_dir / "config.gin").read_text()
    assert all(line in saved for line in ["T5Config.norm = 'gemma_rms_norm'", "T5Config.separate_embeddings = True",
                                          "T5Config.sliding_window = 8"])
    losses = [json.loads(line)["loss"] for line in open(model_dir / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_t5gemma_trained_from_scratch_starts_at_unit_variance_logits():
    """Failed before: the table's rows had T5's std 1, so with Gemma's sqrt(d) input scale and unscaled tied logits
    the first logits had std ~ sqrt(d) (a loss near 30 at d = 256, against ln(vocab) ~ 9 for a uniform guess)."""
    from t5lite.model import get_config
    cfg = get_config("t5gemma_2b_2b", vocab_size=512, emb_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
                     query_pre_attn_scalar=64.0, mlp_dim=512, num_encoder_layers=2, num_decoder_layers=2,
                     sliding_window=8)
    params = init_params(cfg, jax.random.key(0))
    assert float(np.std(params["token_embedder"]["embedding"])) == pytest.approx(256 ** -0.5, rel=0.05)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, 512)
    logits = EncoderDecoder(cfg).apply({"params": params}, tokens, tokens, tokens)  # [B, T, V]
    assert 0.3 < float(jnp.std(logits)) < 3.0
