"""Random-initialised HF T5 checkpoints built offline, the independent reference for parity tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import T5Config as HFConfig, T5ForConditionalGeneration  # noqa: E402

torch.set_num_threads(2)


def make_hf_checkpoint(path, *, untied=False, seed=0, **config):
    """Saves a random HF T5 to `path` and returns the model as HF loads it back from disk.

    transformers 5 always ties lm_head to the embedding in memory, so an untied (v1.1-style)
    checkpoint is made the way real ones exist: a distinct lm_head.weight on disk and
    tie_word_embeddings false in config.json.
    """
    torch.manual_seed(seed)
    cfg = HFConfig(dropout_rate=0.0, tie_word_embeddings=not untied, decoder_start_token_id=0, **config)
    model = T5ForConditionalGeneration(cfg)
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    model.save_pretrained(path)
    return load_hf(path)


def load_hf(path):
    return T5ForConditionalGeneration.from_pretrained(path).eval()


def hf_logits(model, enc, dec_in):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(enc), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(enc) > 0, dtype=torch.long),
                    decoder_input_ids=torch.tensor(np.asarray(dec_in), dtype=torch.long))
    return out.logits.numpy()


def random_batch(rng, vocab_size, enc_lengths, dec_lengths, enc_len, dec_len):
    """Random tokens in [2, vocab) with right padding per row; decoder inputs are targets shifted right."""
    enc = np.zeros((len(enc_lengths), enc_len), np.int32)
    targets = np.zeros((len(dec_lengths), dec_len), np.int32)
    for i, (n, m) in enumerate(zip(enc_lengths, dec_lengths)):
        enc[i, :n] = rng.integers(2, vocab_size, n)
        targets[i, :m] = rng.integers(2, vocab_size, m)
    dec_in = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return enc, dec_in, targets


def check_card_against_peft(tmp_path, cfg, params, load_float32, logits_of, batch):
    """A random LoRA card (rank 3 on q, v, o, wi, wo; B non-zero) on a converted base `params` exports to PEFT, and
    PEFT on HF's model (`load_float32()`; `logits_of(model)` its logits on `batch`) gives t5lite's logits."""
    import jax
    import pytest

    peft = pytest.importorskip("peft")
    from t5lite.convert.peft import export_peft
    from t5lite.model import EncoderDecoder, lora
    from t5lite.train.cards import Card

    spec = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "v", "o", "wi", "wo"))
    card = jax.jit(lambda k: lora.init_card(cfg, spec, k))(jax.random.key(0))
    rng = np.random.default_rng(1)
    card = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.3, x.shape).astype(np.float32) if p[-1].key == "lora_b" else np.asarray(x), card)
    export_peft(Card(spec, card, lora.fingerprint(params, cfg), cfg), str(tmp_path / "peft"))

    enc, dec_in, targets = batch
    reference = logits_of(peft.PeftModel.from_pretrained(load_float32(), str(tmp_path / "peft")).eval())

    def adapted(p, c):
        with lora.adapted(spec):
            return EncoderDecoder(cfg).apply({"params": p, "lora": c}, enc, dec_in, decoder_target_tokens=targets)

    ours = np.asarray(jax.jit(adapted)(params, card))
    mask = targets > 0
    assert np.abs(reference[mask] - logits_of(load_float32())[mask]).max() > 0.01  # PEFT applied the card
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-4 * np.abs(reference).max(), rtol=1e-4)


def t5lite_logits(cfg, params, enc, dec_in, targets):
    """t5lite's float32 logits [B, T, V] of a converted model on a padded batch."""
    from t5lite.model import EncoderDecoder
    return np.asarray(EncoderDecoder(cfg).apply({"params": params}, enc, dec_in, decoder_target_tokens=targets))


def assert_logit_parity(ours, load, enc, dec_in, targets, logits_of=None):
    """t5lite float32 `ours` vs HF float64 (`load(dtype)` gives HF's model), within max(1e-4, 2 x HF float32's own
    error), relative to the largest |logit| over real target positions (padded ones are masked differently on
    purpose) -> (HF's float64 logits, that largest |logit|). `logits_of(model)` gives HF's logits [B, T, V]
    (default: hf_logits on enc, dec_in)."""
    logits_of = logits_of or (lambda model: hf_logits(model, enc, dec_in))
    ref = logits_of(load(torch.float64))
    ref32 = logits_of(load(torch.float32))
    valid = targets > 0
    scale = np.abs(ref[valid]).max()
    hf_error = np.abs(ref32[valid] - ref[valid]).max() / scale
    err = np.abs(ours[valid] - ref[valid]).max() / scale
    assert err <= max(1e-4, 2 * hf_error), f"t5lite error {err:.2e}, HF float32's own {hf_error:.2e}"
    return ref, scale


def assert_same_params(params, other):
    """The same tree paths and bit-identical leaves (a to-hf -> from-hf round trip)."""
    import jax
    flat, flat2 = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(other)
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    for (_, a), (_, b) in zip(flat, flat2):
        np.testing.assert_array_equal(np.asarray(a), b)


def hf_generate(model, enc, max_new_tokens=12, **kwargs):
    """HF `generate` without sampling on the padded prompts `enc` [B, L] -> (its tokens without the start token,
    HF's whole output: sequences_scores for beams)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0).long(),
                             max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_scores=True, **kwargs)
    return out.sequences.numpy()[:, 1:], out


def padded_prompts(vocab_size, low=2):
    """Six prompts of lengths 11, 3, 7, 1, 9, 5 (random tokens in [low, vocab), then EOS), right-padded to 11."""
    rng = np.random.default_rng(3)
    lengths = [11, 3, 7, 1, 9, 5]
    enc = np.zeros((len(lengths), 11), np.int32)
    for i, n in enumerate(lengths):
        enc[i, :n - 1] = rng.integers(low, vocab_size, n - 1)
        enc[i, n - 1] = 1
    return enc


def normalise_generated(tokens, length):
    """Pad to `length` and zero everything after the first EOS (HF fills with EOS or pad)."""
    tokens = np.pad(np.asarray(tokens), ((0, 0), (0, length - tokens.shape[1])))
    after = np.cumsum(np.cumsum(tokens == 1, 1), 1) > 1
    return np.where(after, 0, tokens)
