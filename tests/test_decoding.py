"""Decoding: the KV cache against the full forward pass, HF generate parity, sampling semantics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.convert.hf import from_hf
from t5lite.errors import UserError
from t5lite.infer import generate
from t5lite.infer.decoding import _filter_logits, _generate
from t5lite.model import DecoderOnly, EncoderDecoder, get_config, init_params, scan_params
from t5lite.model.layers import first_argmax


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return cfg, init_params(cfg, jax.random.key(0))


def test_first_argmax_is_numpy_argmax_with_ties_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # small integers: many tied maxima
    x[5, [3, 30]] = np.nan  # the first NaN wins, as in argmax
    x[6, :] = -np.inf
    x[7, 36] = np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_steps_equal_full_forward(tiny, scan):
    cfg, params = tiny
    if scan:
        cfg, params = cfg.replace(scan_layers=True), scan_params(params)
    model = EncoderDecoder(cfg)
    rng = np.random.default_rng(0)
    enc = np.array([list(rng.integers(2, 500, 9)) + [1], list(rng.integers(2, 500, 4)) + [1] + [0] * 5])
    dec = np.concatenate([np.zeros((2, 1), int), rng.integers(2, 500, (2, 11))], axis=1)  # [2, 12]
    full = model.apply({"params": params}, enc, dec)  # [2, 12, V]

    encoded = model.apply({"params": params}, enc, method=model.encode)
    _, variables = model.apply({"params": params}, encoded, enc, dec[:, :1], decode=True, max_decode_length=12,
                               method=model.decode, mutable=["cache"])
    cache = variables["cache"]
    for t in range(12):
        logits, variables = model.apply({"params": params, "cache": cache}, None, enc, dec[:, t:t + 1], decode=True,
                                        decode_position=jnp.int32(t), max_decode_length=12, method=model.decode,
                                        mutable=["cache"])
        cache = variables["cache"]
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("variant", ["mha", "gqa_scanned"])
def test_beams_sharing_the_cross_attention_cache_equal_the_full_forward(variant):
    """Beam search keeps one cross-attention cache row per example, shared by its beams (adjacent rows);
    stepping 3 beams per example, each on its own tokens, gives the full forward pass of every row."""
    cfg = get_config("tiny", num_kv_heads=2 if variant == "gqa_scanned" else None)
    params = init_params(cfg, jax.random.key(1))
    if variant == "gqa_scanned":
        cfg, params = cfg.replace(scan_layers=True), scan_params(params)
    model, beams, axis = EncoderDecoder(cfg), 3, _batch_axis(cfg)
    rng = np.random.default_rng(1)
    enc = np.array([list(rng.integers(2, 500, 6)) + [1], list(rng.integers(2, 500, 3)) + [1, 0, 0, 0]])  # [2, 7]
    row_enc = np.repeat(enc, beams, axis=0)  # [6, 7]: beams adjacent
    dec = np.concatenate([np.zeros((6, 1), int), rng.integers(2, 500, (6, 5))], axis=1)  # [6, 6]
    full = model.apply({"params": params}, row_enc, dec)  # [6, 6, V]

    encoded = model.apply({"params": params}, enc, method=model.encode)  # [2, 7, D]: once per example
    _, variables = model.apply({"params": params}, encoded, enc, dec[::beams, :1], decode=True, max_decode_length=6,
                               method=model.decode, mutable=["cache"])
    cache = jax.tree_util.tree_map_with_path(  # self-attention rows per beam; cross-attention rows per example
        lambda path, x: jnp.repeat(x, beams, axis=axis) if path[-1].key.startswith("cached_") else x,
        variables["cache"])
    for t in range(6):
        logits, variables = model.apply({"params": params, "cache": cache}, None, row_enc, dec[:, t:t + 1],
                                        decode=True, decode_position=jnp.int32(t), max_decode_length=6,
                                        method=model.decode, mutable=["cache"])
        cache = variables["cache"]
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5 * np.abs(full).max())
    cross = [x for path, x in jax.tree_util.tree_leaves_with_path(cache) if path[-1].key == "cross_key"]
    assert cross and all(x.shape[axis] == 2 for x in cross)


def _batch_axis(cfg):
    return 1 if cfg.scan_layers else 0


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_loop_never_relayouts_a_cache(tiny, method):
    """The caches are stored heads first, the layout the attention matmuls read: no instruction of the
    compiled decoding loop produces a transposed copy of a cached key or value (XLA's CPU backend used to
    transpose every layer's cross-attention keys and values, and the self-attention cache, at every step)."""
    cfg, params = tiny
    batch, beams, length, steps = 2, 3, 9, 12
    rows = batch * beams if method == "beam" else batch
    inputs = np.random.default_rng(0).integers(2, 500, (batch, length)).astype(np.int32)
    compiled = _generate.lower(cfg, params, inputs, jnp.int32(0), None, None, None, max_decode_length=steps,
                               method=method, num_beams=beams, length_penalty=1.0, length_penalty_style="hf",
                               early_stopping=True, temperature=1.0, top_k=0, top_p=1.0, decoder_only=False,
                               card_spec=None).compile().as_text()
    # The self- and cross-attention caches: rows x kv heads x slots x head dims, in some order.
    heads, dh = cfg.kv_heads, cfg.head_dim
    cache_dims = [sorted((rows, heads, steps + 1, dh)), sorted((batch, heads, length, dh))]
    body_name = re.search(r"while\(.*body=%?([\w.\-]+)", compiled).group(1)
    body = re.search(rf"\n%?{re.escape(body_name)} .*?\n}}", compiled, re.S).group(0)
    shapes = lambda text: {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\]", text)}  # noqa: E731
    carried = {s for s in shapes(body.split("\n")[1]) if sorted(s) in cache_dims}  # the loop state's caches
    relayouts = []
    for line in body.splitlines()[2:]:
        out = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]\S* (\S+)\(", line)
        dims = out and tuple(int(d) for d in out.group(1).split(","))
        if dims and out.group(2) != "bitcast" and sorted(dims) in cache_dims and dims not in carried:
            relayouts.append(line.strip()[:120])
    assert len(carried) == 2 and not relayouts, relayouts


def test_greedy_scores_are_the_model_log_probs(tiny):
    cfg, params = tiny
    enc = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0]])
    tokens, scores = generate(cfg, params, enc, max_decode_length=8)
    tokens = np.asarray(tokens)
    dec_in = np.concatenate([np.zeros((2, 1), int), tokens[:, :-1]], axis=1)
    log_probs = jax.nn.log_softmax(EncoderDecoder(cfg).apply({"params": params}, enc, dec_in))
    np.testing.assert_array_equal(np.argmax(log_probs, -1)[tokens > 0], tokens[tokens > 0])
    picked = np.take_along_axis(np.asarray(log_probs), tokens[..., None], -1)[..., 0]
    valid = np.cumsum(np.cumsum(tokens == 1, 1), 1) <= 1  # up to and including EOS
    np.testing.assert_allclose(scores, (picked * valid).sum(1), rtol=1e-5)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_decoder_only_generation_matches_full_forward(prefix_lm):
    cfg = get_config("tiny", decoder_only_prefix_lm=prefix_lm)
    params = init_params(cfg, jax.random.key(2), decoder_only=True)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])  # right-padded, different lengths
    tokens, _ = generate(cfg, params, prompts, max_decode_length=6, decoder_only=True)
    model = DecoderOnly(cfg)
    for row, prompt in enumerate([[5, 6, 7, 8], [9, 10]]):
        seq = [0] + prompt
        for t in range(6):  # re-run the whole prefix each step: no cache involved
            x = np.array([seq])
            causal = np.array([[1] * (len(prompt) + 1) + [0] * (len(seq) - len(prompt) - 1)])
            logits = model.apply({"params": params}, x, decoder_causal_attention=causal)
            seq.append(int(np.argmax(logits[0, -1])))
            assert seq[-1] == int(tokens[row, t])
            if seq[-1] == 1:
                break


def test_decoder_only_beam_search_scores_its_tokens_like_the_full_forward():
    """Decoder-only beams start from one prefill per prompt (repeated for the beams): each example's best
    hypothesis scores what the full forward pass, without a cache, gives its tokens (alpha 0: the sum)."""
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(2), decoder_only=True)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])  # right-padded, different lengths
    tokens, scores = generate(cfg, params, prompts, max_decode_length=6, method="beam", num_beams=3,
                              length_penalty=0.0, decoder_only=True)
    model = DecoderOnly(cfg)
    for row, prompt in enumerate([[5, 6, 7, 8], [9, 10]]):
        out = [int(t) for t in tokens[row]]
        out = out[:out.index(1) + 1] if 1 in out else out
        seq = np.array([[0] + prompt + out])
        log_probs = jax.nn.log_softmax(model.apply({"params": params}, seq[:, :-1]))[0]  # [T, V]
        picked = [log_probs[len(prompt) + j, token] for j, token in enumerate(out)]
        np.testing.assert_allclose(scores[row], np.sum(picked), rtol=1e-5)


def test_sampling_top_k_one_and_tiny_temperature_equal_greedy(tiny):
    cfg, params = tiny
    enc = np.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
    greedy, _ = generate(cfg, params, enc, max_decode_length=8)
    np.testing.assert_array_equal(generate(cfg, params, enc, max_decode_length=8, method="sample", top_k=1, seed=3)[0],
                                  greedy)
    np.testing.assert_array_equal(
        generate(cfg, params, enc, max_decode_length=8, method="sample", temperature=1e-4, seed=4)[0], greedy)


def test_sampling_is_seeded(tiny):
    cfg, params = tiny
    enc = np.array([[5, 6, 7, 8, 1]])
    run = lambda seed: np.asarray(generate(cfg, params, enc, max_decode_length=8, method="sample", seed=seed)[0])  # noqa: E731
    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_top_p_samples_from_the_nucleus_with_renormalised_probabilities(tiny):
    cfg, params = tiny
    # Sharpen the output layer so the first-token distribution has a small, known nucleus.
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 5.0
    enc = np.tile(np.array([[5, 6, 7, 8, 1]]), (4000, 1))
    probs = np.asarray(jax.nn.softmax(EncoderDecoder(cfg).apply({"params": params}, enc[:1], np.zeros((1, 1), int))[0, 0]))
    order = np.argsort(-probs)
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.7) + 1]
    assert 2 <= len(nucleus) < 20
    tokens, _ = generate(cfg, params, enc, max_decode_length=1, method="sample", top_p=0.7, seed=11)
    first = np.asarray(tokens)[:, 0]
    assert set(first) <= set(nucleus)
    expected = probs[nucleus] / probs[nucleus].sum()
    observed = np.array([(first == t).mean() for t in nucleus])
    assert np.abs(observed - expected).max() < 0.03, (observed, expected)


def test_filtering_matches_hf_logits_warpers():
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (1.0, 0, 0.3)]:
        ref = torch.tensor(logits)
        ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = np.asarray(_filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
        finite = ~np.isinf(ours)
        np.testing.assert_allclose(ours[finite], ref.numpy()[finite], rtol=1e-6)


def test_bad_arguments_are_user_errors(tiny):
    cfg, params = tiny
    with pytest.raises(UserError, match="choose from"):
        generate(cfg, params, np.array([[5, 1]]), max_decode_length=4, method="nucleus")
    with pytest.raises(UserError, match="top_p"):
        generate(cfg, params, np.array([[5, 1]]), max_decode_length=4, method="sample", top_p=0.0)


# --- Parity with HF generate ---------------------------------------------------------------------

HF_SPEC = dict(vocab_size=24, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               feed_forward_proj="gated-gelu", initializer_factor=2.0)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    from tests.hf_reference import make_hf_checkpoint
    path = tmp_path_factory.mktemp("hfgen") / "model"
    hf = make_hf_checkpoint(path, untied=True, seed=5, **HF_SPEC)
    cfg, params = from_hf(str(path))
    rng = np.random.default_rng(3)
    lengths = [11, 3, 7, 1, 9, 5, 8, 2]
    enc = np.zeros((len(lengths), 11), np.int32)
    for i, n in enumerate(lengths):
        enc[i, :n - 1] = rng.integers(2, 24, n - 1)
        enc[i, n - 1] = 1
    return hf, cfg, params, enc


def _hf_generate(hf, enc, **kwargs):
    import torch
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                          attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                          return_dict_in_generate=True, output_scores=True, **kwargs)
    seqs = out.sequences.numpy()[:, 1:]  # drop the start token
    return seqs, out


def _normalise(tokens, length):
    """Pad to `length` and zero everything after the first EOS (HF fills with EOS or pad)."""
    tokens = np.pad(np.asarray(tokens), ((0, 0), (0, length - tokens.shape[1])))
    after = np.cumsum(np.cumsum(tokens == 1, 1), 1) > 1
    return np.where(after, 0, tokens)


def test_greedy_matches_hf_generate(hf_pair):
    hf, cfg, params, enc = hf_pair
    ref, _ = _hf_generate(hf, enc, max_new_tokens=16, do_sample=False, num_beams=1)
    ours, _ = generate(cfg, params, enc, max_decode_length=16)
    assert (np.asarray(ours) > 1).sum() > 20  # not trivially empty outputs
    np.testing.assert_array_equal(_normalise(np.asarray(ours), 16), _normalise(ref, 16))


@pytest.mark.parametrize("length_penalty", [0.6, 1.0])
def test_beam_search_matches_hf_generate(hf_pair, length_penalty):
    hf, cfg, params, enc = hf_pair
    ref, out = _hf_generate(hf, enc, max_new_tokens=16, do_sample=False, num_beams=4,
                            length_penalty=length_penalty, early_stopping=True)
    ours, scores = generate(cfg, params, enc, max_decode_length=16, method="beam", num_beams=4,
                            length_penalty=length_penalty)
    assert (np.asarray(ours) == 1).any(axis=1).sum() >= 2  # some hypotheses end at EOS, not at max length
    np.testing.assert_array_equal(_normalise(np.asarray(ours), 16), _normalise(ref, 16))
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-4)
