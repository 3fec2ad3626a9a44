"""LongT5 (local and transient-global encoder attention) against HF transformers: logits, `to-hf` round trips,
greedy and beam generate, preset parameter counts; packing and the blockwise path against t5lite's own dense path;
a 2-step `t5lite train` through a models/longt5 gin file.

The reference is HF's PyTorch LongT5 built from a random config, saved and converted, run in float64;
t5lite in float32 must be within max(1e-4, 2 x HF-float32's own error) relative to the largest logit.
"""

import os

import jax
import numpy as np
import pytest

from tests.conftest import QUICK
from tests.hf_reference import (assert_logit_parity, check_card_against_peft, hf_generate, hf_logits,
                                 normalise_generated, padded_prompts, random_batch, t5lite_logits)
from t5lite.convert.hf import config_to_hf, from_hf, to_hf
from t5lite.convert.safetensors_io import read_safetensors
from t5lite.errors import UserError
from t5lite.infer import generate
from t5lite.model import EncoderDecoder, abstract_params, count_params, get_config, init_params, scan_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {  # odd sizes, several layers, unequal depths; 23-token rows span several local and global blocks
    "local_untied_gated": dict(encoder_attention_type="local", vocab_size=97, d_model=24, d_kv=5, num_heads=3,
                               d_ff=37, num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                               relative_attention_num_buckets=16, relative_attention_max_distance=20, local_radius=4,
                               untied=True),
    "local_tied_relu": dict(encoder_attention_type="local", vocab_size=89, d_model=20, d_kv=6, num_heads=2, d_ff=27,
                            num_layers=2, num_decoder_layers=3, feed_forward_proj="relu", local_radius=2),
    "tglobal_untied_gated": dict(encoder_attention_type="transient-global", vocab_size=101, d_model=24, d_kv=6,
                                 num_heads=3, d_ff=40, num_layers=3, num_decoder_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
                                 relative_attention_max_distance=20, local_radius=3, global_block_size=4, untied=True),
    "tglobal_tied_relu": dict(encoder_attention_type="transient-global", vocab_size=83, d_model=20, d_kv=4,
                              num_heads=5, d_ff=33, num_layers=4, num_decoder_layers=2, feed_forward_proj="relu",
                              local_radius=5, global_block_size=3),
}


def make_hf(path, *, untied=False, seed=0, **config):
    """Saves a random HF LongT5 to `path`; returns a loader (float32 / float64) of it as HF reads it back."""
    torch.manual_seed(seed)
    cfg = transformers.LongT5Config(dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=not untied,
                                    **config)
    model = transformers.LongT5ForConditionalGeneration(cfg)
    if untied:  # a distinct lm_head.weight on disk, as the published (v1.1-style) checkpoints have
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    model.save_pretrained(path)
    return lambda dtype=torch.float32: load_hf(path, dtype)


def load_hf(path, dtype=torch.float32):
    return transformers.LongT5ForConditionalGeneration.from_pretrained(path).eval().to(dtype)


def _case(name, tmp_path):
    spec = dict(CASES[name])
    untied = spec.pop("untied", False)
    return make_hf(tmp_path / "hf", untied=untied, **spec), untied


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_hf_logits_match_and_to_hf_writes_them_back(name, tmp_path):
    load, untied = _case(name, tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    kind = CASES[name]["encoder_attention_type"]
    assert cfg.encoder_attention == {"local": "longt5_local", "transient-global": "longt5_transient_global"}[kind]
    assert (cfg.local_radius, cfg.logits_via_embedding) == (CASES[name]["local_radius"], not untied)
    # Rows of 23, 9, 4 (fewer tokens than a global block in some cases) and 14 tokens, right-padded.
    enc, dec_in, targets = random_batch(np.random.default_rng(0), cfg.vocab_size, [23, 9, 4, 14], [13, 5, 1, 6],
                                        23, 13)
    ref, scale = assert_logit_parity(t5lite_logits(cfg, params, enc, dec_in, targets), load, enc, dec_in, targets)
    if kind == "local":  # the rows are long enough for the window to matter: T5's full attention is far off
        full = t5lite_logits(cfg.replace(encoder_attention=None), params, enc, dec_in, targets)
        assert np.abs(full - ref)[targets > 0].max() / scale > 1e-2
    # to-hf writes back exactly the tensors and architecture it read.
    to_hf(cfg, params, str(tmp_path / "out"))
    theirs, back = read_safetensors(str(tmp_path / "hf")), read_safetensors(str(tmp_path / "out"))
    copies = _STACK_EMBEDDINGS | (set() if untied else {"lm_head.weight"})
    assert set(back) <= set(theirs) and {k for k in theirs if k not in back} <= copies
    for key, value in back.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    assert from_hf(str(tmp_path / "out"))[0] == cfg


# Copies of shared.weight that transformers 5 may save; t5lite's stacks share one embedding (from_hf checks).
_STACK_EMBEDDINGS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def test_to_hf_and_the_config_refuse_what_they_cannot_hold():
    cfg = get_config("tiny", encoder_attention="longt5_local", relative_attention_per_layer=True)
    with pytest.raises(UserError, match="LongT5 cannot represent relative_attention_per_layer=True") as e:
        config_to_hf(cfg)
    with pytest.raises(UserError, match="set T5Config.encoder_attention='longt5_local'") as e2:
        get_config("tiny", attention="longt5_local")  # the decoder would silently stay T5's
    with pytest.raises(UserError, match="needs position_scheme='t5_relative_bias'") as e3:
        get_config("tiny", encoder_attention="longt5_transient_global", position_scheme="rope")
    assert all("\n" not in str(x.value) for x in (e, e2, e3))


@pytest.mark.extended  # ~25 s; the PEFT export itself is checked on UMT5 / Switch in make test (test_family_parity)
def test_peft_export_of_a_card_gives_hf_peft_the_same_logits(tmp_path):
    """A LoRA card on a converted transient-global base (its value projection also reads the global tokens)
    exports to PEFT under HF's TransientGlobalSelfAttention names; PEFT on HF's model gives t5lite's logits."""
    load, _ = _case("tglobal_untied_gated", tmp_path)
    cfg, params = from_hf(str(tmp_path / "hf"))
    batch = random_batch(np.random.default_rng(0), cfg.vocab_size, [19, 6], [7, 2], 19, 7)
    check_card_against_peft(tmp_path, cfg, params, lambda: load(torch.float32),
                            lambda model: hf_logits(model, batch[0], batch[1]), batch)


# --- t5lite against itself: packing and the blockwise path -------------------------------------------


def _encode(cfg, params, tokens, segment_ids=None):
    return np.asarray(EncoderDecoder(cfg).apply({"params": params}, tokens, segment_ids,
                                                method=EncoderDecoder.encode))


@pytest.mark.parametrize("attention", ["longt5_local", "longt5_transient_global"])
def test_packed_segments_encode_as_if_alone(attention):
    """Two segments packed in one row (19 + 10 tokens) give each segment's unpacked encoding: local windows,
    global blocks and their relative offsets restart in every segment. The unpacked side runs scanned and
    rematerialised (the stack's bias goes through nn.scan as a broadcast pytree)."""
    cfg = get_config("tiny", encoder_attention=attention, local_radius=3, global_block_size=4, num_encoder_layers=2)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, cfg.vocab_size, 19), rng.integers(2, cfg.vocab_size, 10)
    packed = np.zeros((1, 32), np.int32)
    packed[0, :29] = np.concatenate([a, b])
    segments = np.zeros((1, 32), np.int32)
    segments[0, :19], segments[0, 19:29] = 1, 2
    alone = np.zeros((2, 32), np.int32)
    alone[0, :19], alone[1, :10] = a, b
    scanned = cfg.replace(scan_layers=True, remat_policy="full")
    out, ref = _encode(cfg, params, packed, segments), _encode(scanned, scan_params(params), alone)
    np.testing.assert_allclose(out[0, :19], ref[0, :19], atol=2e-5)
    np.testing.assert_allclose(out[0, 19:29], ref[1, :10], atol=2e-5)


def test_local_attention_blockwise_equals_dense_and_tglobal_refuses_it():
    cfg = get_config("tiny", encoder_attention="longt5_local", local_radius=5, attention_block_q=8,
                     attention_block_k=8)
    params = init_params(cfg, jax.random.key(1))
    tokens, _, _ = random_batch(np.random.default_rng(2), cfg.vocab_size, [37, 20], [1, 1], 37, 1)
    dense = _encode(cfg, params, tokens)
    blockwise = _encode(cfg.replace(attention_impl="blockwise"), params, tokens)
    valid = tokens > 0
    np.testing.assert_allclose(blockwise[valid], dense[valid], atol=2e-5)
    tglobal = cfg.replace(encoder_attention="longt5_transient_global", attention_impl="blockwise")
    with pytest.raises(UserError, match="dense path only") as e:
        _encode(tglobal, init_params(tglobal.replace(attention_impl="dense"), jax.random.key(1)), tokens)
    assert "\n" not in str(e.value)


# --- generate ---------------------------------------------------------------------------------------


def test_greedy_and_beam_match_hf_generate(tmp_path):
    """Transient-global (its encoder holds local attention too); the decoder on its KV cache is T5's."""
    spec = dict(vocab_size=24, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=3,
                feed_forward_proj="gated-gelu", initializer_factor=2.0, local_radius=2, global_block_size=2,
                encoder_attention_type="transient-global")
    make_hf(tmp_path / "hf", untied=True, seed=5, **spec)
    hf = load_hf(str(tmp_path / "hf"))
    cfg, params = from_hf(str(tmp_path / "hf"))
    enc = padded_prompts(24)
    ours = np.asarray(generate(cfg, params, enc, max_decode_length=12)[0])
    assert (ours > 1).sum() > 15  # not trivially empty outputs
    np.testing.assert_array_equal(normalise_generated(ours, 12),
                                  normalise_generated(hf_generate(hf, enc, num_beams=1)[0], 12))
    ref, out = hf_generate(hf, enc, num_beams=3, length_penalty=0.6, early_stopping=True)
    ours, scores = generate(cfg, params, enc, max_decode_length=12, method="beam", num_beams=3, length_penalty=0.6)
    np.testing.assert_array_equal(normalise_generated(np.asarray(ours), 12), normalise_generated(ref, 12))
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-4)


# --- presets ----------------------------------------------------------------------------------------


def _hf_count(hf_cfg: dict, whole_model: bool) -> int:
    """HF's parameter count of a LongT5 config.json, tied tensors once plus an untied lm_head. On the meta device
    (no weights); `whole_model=False` builds one block of each kind and multiplies, which is what the whole
    model holds (blocks 1.. equal, block 0 adds the relative-bias tables) at a fraction of the time."""
    config = transformers.LongT5Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    untied_head = 0 if hf_cfg["tie_word_embeddings"] else config.vocab_size * config.d_model
    with torch.device("meta"):
        if whole_model:
            model = transformers.LongT5ForConditionalGeneration(config)
            return sum(p.numel() for p in model.parameters()) + untied_head
        block = transformers.models.longt5.modeling_longt5.LongT5Block
        total = config.vocab_size * config.d_model + untied_head + 2 * config.d_model  # shared, head, final norms
        for is_decoder, layers in ((False, config.num_layers), (True, config.num_decoder_layers)):
            stack = transformers.LongT5Config(**{**config.to_dict(), "is_decoder": is_decoder})
            first, other = (sum(p.numel() for p in block(stack, has_relative_attention_bias=i == 0).parameters())
                            for i in (0, 1))
            total += first + (layers - 1) * other
        return total


def test_preset_parameter_counts_equal_hf():
    """Every LongT5 preset against HF's count of the config.json that to-hf writes for it; the block-wise count
    is checked against a whole HF model on base."""
    for name in [f"longt5_{a}_{k}" for a in ("local", "tglobal") for k in ("base", "large", "xl")]:
        cfg = get_config(name)
        hf_cfg = config_to_hf(cfg)  # also checks that to-hf can write the preset
        assert not cfg.logits_via_embedding and not hf_cfg["tie_word_embeddings"]
        expected = _hf_count(hf_cfg, whole_model=False)
        if name.endswith("_base"):
            assert _hf_count(hf_cfg, whole_model=True) == expected
        # Scanned: the same parameters, traced once per stack instead of once per layer (golden files pin the layout).
        assert count_params(abstract_params(cfg.replace(scan_layers=True))) == expected, name


@pytest.mark.slow
def test_two_train_steps_through_a_longt5_gin_file(tmp_path):
    """`t5lite train` with models/longt5_tglobal_base.gin shrunk by --gin overrides; packed span-corruption rows."""
    from t5lite.cli import main

    shrink = ["emb_dim=32", "num_heads=2", "head_dim=8", "mlp_dim=48", "num_encoder_layers=1",
              "num_decoder_layers=1", "vocab_size=8192", "local_radius=3", "global_block_size=4"]
    args = [a for a in QUICK if "models/tiny.gin" not in a] + ["--gin_file=experiments/models/longt5_tglobal_base.gin"]
    assert main(["train", *args, f"--model_dir={tmp_path / 'run'}", "--gin.TRAIN_STEPS=2",
                 "--gin.CHECKPOINT_PERIOD=2", 
                 *[f"--gin.T5Config.{s}" for s in shrink]]) == 0
    from t5lite.train.load import load_for_inference
    cfg, params, _, _ = load_for_inference(str(tmp_path / "run"))
    assert (cfg.encoder_attention, cfg.local_radius, cfg.emb_dim) == ("longt5_transient_global", 3, 32)
    assert params["encoder"]["global_relpos_bias"]["rel_embedding"].shape == (2, 32)
