"""`t5lite bench`: throughput, side by side with HF transformers, measured fairly.

Fair means: each framework runs in its own process (both keep their thread pools spinning, so
timing one after the other in one process slows whichever runs second), in rounds that
alternate which one goes first; both load the same weights (one HF-format checkpoint written
once); both train with the same optimizer (AdamW by default, or Adafactor against HF's
Adafactor) and dropout 0 unless asked; results are medians with min-max over every timed step
of every round; MFU is given against the host's theoretical peak and against a matmul peak
measured in the same run. Benchmarks are measurements, not tests: run them on an idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from t5lite.data.vocab import EOS_ID

FRAMEWORKS = ("t5lite", "hf")


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------

def _random_batch(vocab_size, batch_size, input_length, target_length, seed=0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (batch_size, input_length)).astype(np.int32)
    tgt = rng.integers(2, vocab_size, (batch_size, target_length)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    return dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt,
                decoder_loss_weights=np.ones_like(tgt))


def _generated_tokens(tokens: np.ndarray) -> int:
    """Tokens up to and including each row's EOS (or all of them when there is none)."""
    tokens = np.asarray(tokens)
    after_eos = np.cumsum(np.cumsum(tokens == EOS_ID, axis=1), axis=1) > 1
    return int((~after_eos).sum())


def _summary(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _write_weights(model: str, overrides: dict, directory: str, with_hf: bool, seed: int = 0) -> dict:
    """The benchmark's weights (random init, `seed`), written once: a t5lite params checkpoint (any
    variant) and, for the HF side, the same weights as an HF T5 checkpoint. -> their paths."""
    import jax

    from t5lite.convert.hf import family, to_hf
    from t5lite.errors import UserError
    from t5lite.model import get_config, init_params
    from t5lite.train.checkpoint import save_params
    config = get_config(model, **overrides)
    if with_hf and family(config) != "t5":  # the HF side runs T5ForConditionalGeneration
        raise UserError(f"the HF side of the benchmark is HF's T5; {model} is a {family(config)} model: "
                        "benchmark it without the HF comparison (decode --no_hf, train without --with_hf)")
    params = init_params(config, jax.random.key(seed))
    paths = {"t5lite": os.path.join(directory, "t5lite")}
    save_params(paths["t5lite"], config, params)
    if with_hf:
        paths["hf"] = os.path.join(directory, "hf")
        to_hf(config, params, paths["hf"])
    return paths


def _run_worker(kind: str, spec: dict) -> dict:
    """Runs one measurement in a fresh process and returns its JSON result."""
    env = dict(os.environ)
    if kind.endswith("hf"):
        env.setdefault("JAX_PLATFORMS", "cpu")  # the HF worker never imports jax
    proc = subprocess.run([sys.executable, "-m", "t5lite.bench.throughput", kind, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _alternating(kinds: Sequence[str], spec: dict, rounds: int) -> Dict[str, List[dict]]:
    """Each kind once per round, the order reversed every other round."""
    results = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in (kinds if r % 2 == 0 else list(reversed(kinds))):
            results[kind].append(_run_worker(kind, spec))
    return results


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process).
# ---------------------------------------------------------------------------------------------

def _matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 [n, n] @ [n, n] matmul on this host, best of `repeats`."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def _train_t5lite(spec: dict) -> dict:
    """The train step exactly as `t5lite train` builds it (a TrainConfig -> run.build_steps), on random batches."""
    import jax

    from t5lite.train import partitioning
    from t5lite.train.checkpoint import load_params
    from t5lite.train.config import TrainConfig
    from t5lite.train.run import build_steps
    from t5lite.train.state import TrainState
    config, params = load_params(spec["weights"]["t5lite"])
    config = config.replace(dropout_rate=spec["dropout"])
    train = TrainConfig(
        model_dir="(bench: no model_dir)", task="(random batches)", train_steps=spec["steps"] + 1,
        batch_size=spec["batch_size"], feature_lengths={"inputs": spec["input_length"],
                                                        "targets": spec["target_length"]},
        model=config, optimizer=spec["optimizer"], schedule="constant", learning_rate=1e-3, warmup_steps=0,
        optimizer_kwargs={"weight_decay": 0.01, "decay_vectors": True} if spec["optimizer"] == "adamw" else None,
        z_loss=0.0)  # HF's loss has no z-loss: the two sides compute the same thing
    steps = build_steps(train, config, train.make_loss())
    mesh, rules, opt = steps.mesh, steps.rules, steps.optimizer
    state = jax.jit(lambda p: TrainState.create(p, opt), out_shardings=steps.shardings)(
        jax.device_put(params, steps.shardings.params))
    step = steps.train_step
    batch = partitioning.global_batch_from_local(
        _random_batch(config.vocab_size, spec["batch_size"], spec["input_length"], spec["target_length"]), mesh, rules)
    start = time.perf_counter()
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"step_s": times, "compile_s": compile_s, "matmul_flops": _matmul_peak(),
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}


def _train_hf(spec: dict) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration
    torch.set_num_threads(os.cpu_count() or 1)
    model = T5ForConditionalGeneration.from_pretrained(spec["weights"]["hf"], dropout_rate=spec["dropout"]).train()
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        from transformers.optimization import Adafactor  # T5's settings: decay 0.8, clip 1, parameter scale
        opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False,
                        decay_rate=-0.8, clip_threshold=1.0)
    batch = _random_batch(model.config.vocab_size, spec["batch_size"], spec["input_length"], spec["target_length"])
    ids = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)

    def one_step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    return {"step_s": times, "compile_s": compile_s}


def _decode_t5lite(spec: dict) -> dict:
    import jax

    from t5lite.infer import generate
    from t5lite.train.checkpoint import load_params
    config, params = load_params(spec["weights"]["t5lite"])
    params = jax.device_put(params)
    out = {}
    for case in spec["cases"]:
        inputs = _decode_inputs(config.vocab_size, case["batch"], spec["input_length"])

        def run():
            tokens, _ = generate(config, params, inputs, max_decode_length=spec["max_decode_length"],
                                 method="beam" if case["beams"] > 1 else "greedy", num_beams=case["beams"])
            return np.asarray(tokens)
        out[_case_name(case)] = _time_decode(run, spec["repeats"])
    return out


def _decode_hf(spec: dict) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration
    torch.set_num_threads(os.cpu_count() or 1)
    model = T5ForConditionalGeneration.from_pretrained(spec["weights"]["hf"]).eval()
    out = {}
    for case in spec["cases"]:
        inputs = torch.tensor(_decode_inputs(model.config.vocab_size, case["batch"], spec["input_length"]),
                              dtype=torch.long)

        def run():
            with torch.no_grad():
                tokens = model.generate(input_ids=inputs, attention_mask=(inputs > 0).long(),
                                        max_new_tokens=spec["max_decode_length"], num_beams=case["beams"],
                                        do_sample=False, **({"early_stopping": True} if case["beams"] > 1 else {}))
            return tokens.numpy()[:, 1:]
        out[_case_name(case)] = _time_decode(run, spec["repeats"])
    return out


def _decode_inputs(vocab_size, batch, input_length):
    inputs = np.random.default_rng(0).integers(2, vocab_size - 100, (batch, input_length)).astype(np.int32)
    inputs[:, -1] = EOS_ID
    return inputs


def _case_name(case) -> str:
    return f"batch {case['batch']} {'greedy' if case['beams'] == 1 else 'beam' + str(case['beams'])}"


def _time_decode(run, repeats) -> dict:
    tokens = _generated_tokens(run())  # also compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "tokens": tokens}


WORKERS = {"train-t5lite": _train_t5lite, "train-hf": _train_hf, "decode-t5lite": _decode_t5lite,
           "decode-hf": _decode_hf}


# ---------------------------------------------------------------------------------------------
# The benchmarks.
# ---------------------------------------------------------------------------------------------

def train_benchmark(model: str = "tiny", batch_size: int = 8, input_length: int = 128, target_length: int = 32,
                    steps: int = 10, rounds: int = 2, optimizer: str = "adamw", dropout: float = 0.0,
                    with_hf: bool = False, vocab_size: Optional[int] = None, peak_flops: Optional[float] = None,
                    overrides: Optional[dict] = None) -> Dict:
    """Train-step time of t5lite (and HF with `with_hf`) on random tokens, alternating processes."""
    from t5lite.model import get_config
    from t5lite.train.monitor import model_flops_per_step, peak_flops_per_device
    overrides = dict(overrides or {}, **({"vocab_size": vocab_size} if vocab_size else {}))
    with tempfile.TemporaryDirectory() as tmp:
        weights = _write_weights(model, overrides, tmp, with_hf)
        spec = dict(weights=weights, batch_size=batch_size, input_length=input_length, target_length=target_length,
                    steps=steps, optimizer=optimizer, dropout=dropout)
        kinds = ["train-t5lite"] + (["train-hf"] if with_hf else [])
        results = _alternating(kinds, spec, rounds)
    ours = [t for r in results["train-t5lite"] for t in r["step_s"]]
    config = get_config(model, **overrides)
    flops = model_flops_per_step(config, batch_size, input_length, target_length)
    first = results["train-t5lite"][0]
    theoretical = peak_flops_per_device(first["device_kind"], override=peak_flops) * first["devices"]
    measured = statistics.median(r["matmul_flops"] for r in results["train-t5lite"])
    step = _summary(ours)
    row = dict(model=model, overrides=overrides, batch=batch_size, lengths=f"{input_length}/{target_length}",
               optimizer=optimizer, dropout=dropout, rounds=rounds, step_s=step, compile_s=first["compile_s"],
               tokens_per_sec=batch_size * (input_length + target_length) / step["median"],
               mfu_theoretical=flops / step["median"] / theoretical, mfu_matmul=flops / step["median"] / measured,
               matmul_gflops=measured / 1e9, theoretical_gflops=theoretical / 1e9, devices=first["devices"],
               device_kind=first["device_kind"])
    if with_hf:
        row["hf_step_s"] = _summary([t for r in results["train-hf"] for t in r["step_s"]])
        row["speedup"] = row["hf_step_s"]["median"] / step["median"]
    print(_format_train(row), flush=True)
    return row


def _ms(summary) -> str:
    return f"{summary['median'] * 1e3:.1f} ms ({summary['min'] * 1e3:.1f}-{summary['max'] * 1e3:.1f})"


def _format_train(row: Dict) -> str:
    text = (f"{row['model']:>14} batch {row['batch']} {row['lengths']} {row['optimizer']}: t5lite {_ms(row['step_s'])}, "
            f"{row['tokens_per_sec']:.0f} tok/s, MFU {100 * row['mfu_matmul']:.0f}% of the measured matmul peak "
            f"({row['matmul_gflops']:.0f} GFLOP/s), {100 * row['mfu_theoretical']:.0f}% of the theoretical "
            f"({row['theoretical_gflops']:.0f})")
    if "hf_step_s" in row:
        text += f" | HF {_ms(row['hf_step_s'])} | t5lite/HF speed {row['speedup']:.2f}x"
    return text


def decode_benchmark(model: str = "t5_1_1_small", batch_sizes=(1, 32), input_length: int = 128,
                     max_decode_length: int = 64, num_beams: int = 4, with_hf: bool = True, repeats: int = 2,
                     rounds: int = 2, overrides: Optional[dict] = None) -> List[Dict]:
    """tokens/s of greedy and beam search for t5lite and (optionally) HF generate, same weights,
    each framework in its own process, alternating rounds."""
    cases = [dict(batch=b, beams=k) for b in batch_sizes for k in (1, num_beams)]
    with tempfile.TemporaryDirectory() as tmp:
        weights = _write_weights(model, dict(overrides or {}), tmp, with_hf)
        spec = dict(weights=weights, cases=cases, input_length=input_length, max_decode_length=max_decode_length,
                    repeats=repeats)
        results = _alternating(["decode-t5lite"] + (["decode-hf"] if with_hf else []), spec, rounds)
    rows = []
    for case in cases:
        name = _case_name(case)
        ours = [r[name] for r in results["decode-t5lite"]]
        row = dict(model=model, case=name, batch=case["batch"], beams=case["beams"], tokens=ours[0]["tokens"],
                   t5lite_s=_summary([t for r in ours for t in r["seconds"]]))
        row["t5lite_tok_s"] = row["tokens"] / row["t5lite_s"]["median"]
        if with_hf:
            theirs = [r[name] for r in results["decode-hf"]]
            row["hf_tokens"] = theirs[0]["tokens"]
            row["hf_s"] = _summary([t for r in theirs for t in r["seconds"]])
            row["hf_tok_s"] = row["hf_tokens"] / row["hf_s"]["median"]
            row["speedup"] = row["t5lite_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        text = (f"{model:>14} {name:>16}: t5lite {row['t5lite_tok_s']:9.1f} tok/s "
                f"({_ms(row['t5lite_s'])}, {row['tokens']} tokens)")
        if with_hf:
            text += f" | HF {row['hf_tok_s']:9.1f} tok/s ({_ms(row['hf_s'])}) | t5lite/HF {row['speedup']:.2f}x"
        print(text, flush=True)
    return rows


def data_benchmark(task: str = "bible_span_corruption_en_es", batch_size: int = 32, input_length: int = 512,
                   num_batches: int = 128, pack: bool = True) -> Dict:
    """Batches/s and tokens/s of a task's training pipeline (span corruption by default, 32 x 512)."""
    from t5lite.data import tasks
    from t5lite.data.pipeline import benchmark_pipeline
    from t5lite.data.preprocessors import span_corruption_lengths
    entry = tasks.get(task)
    lengths = {"inputs": input_length, "targets": span_corruption_lengths(input_length)[1]}
    iterator = entry.pipeline("train", feature_lengths=lengths, batch_size=batch_size, seed=0, pack=pack,
                              process_index=0, process_count=1)
    result = dict(task=task, batch=batch_size, lengths=f"{lengths['inputs']}/{lengths['targets']}",
                  **benchmark_pipeline(iterator, num_batches))
    print(f"{task}: {result}", flush=True)
    return result


def _worker_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m t5lite.bench.throughput", description="one benchmark worker")
    parser.add_argument("kind", choices=sorted(WORKERS))
    parser.add_argument("spec", help="the measurement as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(WORKERS[args.kind](json.loads(args.spec))), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
