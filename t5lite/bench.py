"""`t5lite bench`: throughput measurements, side by side with HF transformers where one exists.

Benchmarks are measurements, not tests: run them on an idle machine and compare numbers from
the same run only (another busy process halves everything on a 2-core CPU).
"""

import os
import tempfile
import time
from typing import Dict, List

import jax
import numpy as np

from t5lite.model import get_config, init_params


def _best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls after one warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _generated_tokens(tokens: np.ndarray) -> int:
    """Tokens up to and including each row's EOS (or all of them when there is none)."""
    tokens = np.asarray(tokens)
    after_eos = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) > 1
    return int((~after_eos).sum())


def decode_benchmark(model: str = "t5_1_1_small", batch_sizes=(1, 32), input_length: int = 128,
                     max_decode_length: int = 64, num_beams: int = 4, with_hf: bool = True,
                     repeats: int = 2, seed: int = 0) -> List[Dict]:
    """tokens/s of greedy and beam search for t5lite and (optionally) HF generate, same weights."""
    from t5lite.infer import generate
    config = get_config(model)
    params = init_params(config, jax.random.key(seed))
    hf_model = _hf_model(config, params) if with_hf else None
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batch_sizes:
        inputs = rng.integers(2, config.vocab_size - 100, (batch, input_length)).astype(np.int32)
        inputs[:, -1] = 1
        for method, beams in (("greedy", 1), ("beam", num_beams)):
            def ours():
                tokens, _ = generate(config, params, inputs, max_decode_length=max_decode_length, method=method,
                                     num_beams=beams)
                return np.asarray(tokens)
            n_tokens = _generated_tokens(ours())
            row = dict(model=model, batch=batch, method=f"{method}{beams if beams > 1 else ''}",
                       tokens=n_tokens, t5lite_s=_best_of(ours, repeats))
            row["t5lite_tok_s"] = n_tokens / row["t5lite_s"]
            if hf_model is not None:
                row["hf_s"] = _best_of(lambda: _hf_generate(hf_model, inputs, max_decode_length, beams), repeats)
                row["hf_tok_s"] = _generated_tokens(_hf_generate(hf_model, inputs, max_decode_length, beams)) / row["hf_s"]
                row["speedup"] = row["hf_s"] / row["t5lite_s"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _hf_model(config, params):
    """The same weights as an HF T5ForConditionalGeneration (via t5lite.convert.hf.to_hf)."""
    try:
        import torch
        from transformers import T5ForConditionalGeneration
    except ImportError:
        print("transformers/torch not installed: HF comparison skipped (pip install -e '.[test]')")
        return None
    from t5lite.convert.hf import to_hf
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(config, params, os.path.join(tmp, "hf"))
        return T5ForConditionalGeneration.from_pretrained(os.path.join(tmp, "hf")).eval()


def _hf_generate(model, inputs, max_decode_length, beams):
    import torch
    with torch.no_grad():
        ids = torch.tensor(inputs, dtype=torch.long)
        out = model.generate(input_ids=ids, attention_mask=(ids > 0).long(), max_new_tokens=max_decode_length,
                             num_beams=beams, do_sample=False, **({"early_stopping": True} if beams > 1 else {}))
    return out.numpy()[:, 1:]


def _format_row(row: Dict) -> str:
    text = (f"{row['model']:>14} batch {row['batch']:>3} {row['method']:>7}: t5lite {row['t5lite_tok_s']:9.1f} tok/s "
            f"({row['t5lite_s']:.3f} s, {row['tokens']} tokens)")
    if "hf_s" in row:
        text += f" | HF {row['hf_tok_s']:9.1f} tok/s ({row['hf_s']:.3f} s) | t5lite/HF speed {row['speedup']:.2f}x"
    return text
