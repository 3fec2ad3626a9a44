"""Memory and step time of the t5_1_1_small train step at long inputs, dense vs blockwise attention.

Same tokens per batch at every input length (rows = tokens / length; targets = length / 8). Memory is
XLA's analysis of the compiled step (temp = activations and scratch; args = state + batch), so it needs
no allocation; the step time runs real steps and is only measured for --time_lengths.
    PYTHONPATH=$PWD python experiments/long/measure.py --lengths 512,2048,8192,16384 --time_lengths 512,2048
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5lite.model import EncoderDecoder, get_config, init_params
from t5lite.train import step as step_lib
from t5lite.train.state import TrainState

SETTINGS = {  # name -> (T5Config overrides, loss_kwargs)
    "dense": (dict(attention_impl="dense"), None),
    "blockwise": (dict(attention_impl="blockwise"), None),
    "blockwise+chunked_loss": (dict(attention_impl="blockwise"), {"logit_chunk": 2048}),
}


def _batch(rows, length, rng=None, targets=None):
    targets = targets or length // 8
    shapes = {"encoder_input_tokens": (rows, length), "decoder_input_tokens": (rows, targets),
              "decoder_target_tokens": (rows, targets)}
    if rng is None:
        return {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}
    return {k: jnp.asarray(rng.integers(2, 30000, s), jnp.int32) for k, s in shapes.items()}


def measure(setting, length, tokens, timed_steps, preset="t5_1_1_small", targets=None):
    overrides, loss_kwargs = SETTINGS[setting]
    cfg = get_config(preset, **overrides)
    model, optimizer = EncoderDecoder(cfg), optax.adamw(1e-4)
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, optimizer=optimizer, loss_kwargs=loss_kwargs),
                   donate_argnums=(0,))
    rows = max(tokens // length, 1)
    abstract_state = jax.eval_shape(lambda: TrainState.create(init_params(cfg, jax.random.key(0)), optimizer))
    start = time.perf_counter()
    compiled = step.lower(abstract_state, _batch(rows, length, targets=targets)).compile()
    memory = compiled.memory_analysis()
    result = dict(setting=setting, length=length, targets=targets or length // 8, rows=rows, compile_s=round(time.perf_counter() - start, 1),
                  temp_gib=memory.temp_size_in_bytes / 2 ** 30, args_gib=memory.argument_size_in_bytes / 2 ** 30)
    if timed_steps:
        state = TrainState.create(init_params(cfg, jax.random.key(0)), optimizer)
        batch = _batch(rows, length, np.random.default_rng(0), targets)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(timed_steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result["step_s"] = float(np.median(times))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192,16384")
    parser.add_argument("--time_lengths", default="", help="lengths whose step is also timed")
    parser.add_argument("--tokens", type=int, default=16384, help="input tokens per batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--preset", default="t5_1_1_small")
    parser.add_argument("--targets", type=int, default=None, help="target length (default: inputs / 8)")
    args = parser.parse_args()
    timed = {int(x) for x in args.time_lengths.split(",") if x}
    for length in (int(x) for x in args.lengths.split(",")):
        for setting in args.settings.split(","):
            result = measure(setting, length, args.tokens, args.steps if length in timed else 0, args.preset,
                             args.targets)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
