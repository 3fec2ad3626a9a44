"""`t5lite bench`: throughput measurements, side by side with HF transformers where one exists.

Benchmarks are measurements, not tests: run them on an idle machine and compare numbers from
the same run only (another busy process halves everything on a 2-core CPU).
"""

import os
import tempfile
import time
from typing import Dict, List, Optional

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


def train_benchmark(model: str = "tiny", batch_size: int = 8, input_length: int = 128, target_length: int = 32,
                    steps: int = 10, optimizer: str = "adafactor", with_hf: bool = False, vocab_size=None,
                    peak_flops=None, seed: int = 0, overrides: Optional[Dict] = None) -> Dict:
    """Step time, tokens/s and MFU of the jitted, sharded train step on random tokens (all local devices).

    `overrides`: T5Config fields applied to the preset, e.g. {'position_scheme': 'rope'} for an ablation.
    """
    from t5lite.train import partitioning
    from t5lite.train.monitor import model_flops_per_step, peak_flops_per_device
    from t5lite.train.optimizers import make_optimizer
    from t5lite.train.step import make_train_step
    from t5lite.model import EncoderDecoder

    config = get_config(model, **({"vocab_size": vocab_size} if vocab_size else {}), **(overrides or {}))
    opt = make_optimizer(optimizer, "constant", 1e-3, 0)
    mesh = partitioning.make_mesh()
    rules = partitioning.rules_for(mesh)
    shardings = partitioning.state_shardings(config, opt, mesh, rules)
    state = partitioning.init_train_state(config, opt, mesh, rules, jax.random.key(seed))
    step = make_train_step(EncoderDecoder(config), opt, mesh, rules, shardings)
    batch = _random_batch(config, batch_size, input_length, target_length, seed)
    global_batch = partitioning.global_batch_from_local(batch, mesh, rules)

    state, metrics = step(state, global_batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, global_batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    flops = model_flops_per_step(config, batch_size, input_length, target_length)
    peak = peak_flops_per_device(override=peak_flops) * jax.device_count()
    row = dict(model=model, overrides=overrides or {}, batch=batch_size, lengths=f"{input_length}/{target_length}", step_s=seconds,
               tokens_per_sec=batch_size * (input_length + target_length) / seconds, mfu=flops / seconds / peak,
               devices=jax.device_count(), device_kind=jax.devices()[0].device_kind)
    if with_hf:
        row["hf_step_s"] = _hf_train_step_seconds(config, state.params, batch, steps)
        row["speedup"] = row["hf_step_s"] / seconds
    label = model + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    print(f"{label:>14} batch {batch_size} {input_length}/{target_length}: {seconds * 1000:.1f} ms/step, "
          f"{row['tokens_per_sec']:.0f} tok/s, MFU {100 * row['mfu']:.1f}% of {peak / 1e9:.0f} GFLOP/s"
          + (f" | HF {row['hf_step_s'] * 1000:.1f} ms/step, t5lite/HF speed {row['speedup']:.2f}x" if with_hf else ""),
          flush=True)
    return row


def _random_batch(config, batch_size, input_length, target_length, seed) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, config.vocab_size, (batch_size, input_length)).astype(np.int32)
    tgt = rng.integers(2, config.vocab_size, (batch_size, target_length)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    return dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt,
                decoder_loss_weights=np.ones_like(tgt))


def _hf_train_step_seconds(config, params, batch, steps) -> float:
    """The same model and batch in HF transformers (PyTorch, AdamW): fwd + bwd + update, best practice threads."""
    import torch
    model = _hf_model(config, jax.device_get(params))
    if model is None:
        return float("nan")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)

    def one_step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - start) / steps


def data_benchmark(task: str = "bible_span_corruption_en_es", batch_size: int = 32, input_length: int = 512,
                   num_batches: int = 30, pack: bool = True) -> Dict:
    """Batches/s and tokens/s of a task's training pipeline (span corruption by default, 32 x 512)."""
    from t5lite.data import tasks
    from t5lite.data.pipeline import benchmark_pipeline
    from t5lite.data.preprocessors import span_corruption_lengths
    entry = tasks.get(task)
    lengths = {"inputs": input_length, "targets": span_corruption_lengths(input_length)[1]}
    iterator = entry.pipeline("train", feature_lengths=lengths, batch_size=batch_size, seed=0, pack=pack)
    result = dict(task=task, batch=batch_size, lengths=f"{lengths['inputs']}/{lengths['targets']}",
                  **benchmark_pipeline(iterator, num_batches))
    print(f"{task}: {result}", flush=True)
    return result
