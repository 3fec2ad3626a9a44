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
