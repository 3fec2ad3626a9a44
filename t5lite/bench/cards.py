"""`t5lite bench cards`: decoding with N adapter cards mixed in one batch vs one merged model vs card by card.

Random base (a preset) and random cards (rank r on q and v, B nonzero); one batch of B lines, line i
using card i % N. Three ways to answer it, each warmed up (compiled) once and timed `repeats` times:
  merged    the whole batch on one merged checkpoint (the cost of the base alone: the upper bound)
  mixed     the whole batch in one jitted decode, each line gathering its own card (lora.stack_cards)
  by card   for each card, its B / N lines on its merged checkpoint (what serving without mixing costs)
A measurement, not a test: run it on an idle machine.
"""

import statistics
import time
from typing import Dict, List, Sequence

import jax
import numpy as np

from t5lite.infer.decoding import generate
from t5lite.model import get_config, init_params, lora


def _timed(fn, repeats: int):
    """(median seconds, generated tokens) of fn() -> tokens, after one untimed call (compilation)."""
    tokens = np.asarray(fn())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = np.asarray(jax.block_until_ready(fn()))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), int((tokens > 0).sum())


def cards_decode_benchmark(model: str = "t5_1_1_small", batch_size: int = 32, num_cards: Sequence[int] = (1, 4, 16),
                           rank: int = 8, input_length: int = 64, max_decode_length: int = 32, method: str = "greedy",
                           repeats: int = 3) -> List[Dict]:
    config = get_config(model)
    params = jax.jit(lambda k: init_params(config, k))(jax.random.key(0))
    spec = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("q", "v"))
    inputs = np.random.default_rng(0).integers(2, config.vocab_size, (batch_size, input_length)).astype(np.int32)
    decode = dict(max_decode_length=max_decode_length, method=method)
    rows = []
    for n in num_cards:
        if batch_size % n:
            raise SystemExit(f"--num_cards {n} must divide --batch_size {batch_size}")
        cards = []
        for i in range(n):
            card = jax.jit(lambda k: lora.init_card(config, spec, k))(jax.random.key(i + 1))
            cards.append(jax.tree_util.tree_map_with_path(
                lambda p, x, i=i: x + 0.02 * jax.random.normal(jax.random.key(1000 + i), x.shape)
                if p[-1].key == "lora_b" else x, card))
        merged = [jax.jit(lambda p, c: lora.merge(p, c, spec))(params, c) for c in cards]
        table = lora.stack_cards([(spec, jax.device_get(c)) for c in cards], config)
        index = np.arange(batch_size) % n
        rows_of = [np.flatnonzero(index == i) for i in range(n)]
        cases = {
            "merged": lambda: generate(config, merged[0], inputs, **decode)[0],
            "mixed": lambda: generate(config, params, inputs, cards=table, card_index=index, **decode)[0],
            "by card": lambda: np.concatenate([np.asarray(generate(config, merged[i], inputs[rows], **decode)[0])
                                               for i, rows in enumerate(rows_of)]),
        }
        row = dict(model=model, batch=batch_size, cards=n, rank=rank, method=method,
                   table_floats=lora.num_card_params(table.table))
        for name, fn in cases.items():
            seconds, tokens = _timed(fn, repeats)
            row[f"{name} tok/s"] = tokens / seconds
        rows.append(row)
        print(f"{model} batch {batch_size}, {n:3d} cards (rank {rank}, q v; table {row['table_floats']:,} floats): "
              + " | ".join(f"{k} {row[k]:8.1f}" for k in row if k.endswith("tok/s")), flush=True)
    return rows
