"""The collectives and memory a sharded train / eval step cannot do without, per chip and step.

`t5lite compile` prints these next to what XLA emitted (t5lite/compile/program_stats.py) and flags
what is over 1.1x. Bytes are what one chip *sends*, as ring collectives do ("How to scale your
model", ch. 3, the convention MaxText's and the scaling book's rooflines use; program_stats.ring_bytes
counts XLA's ops the same way): over a group of n chips, an all-gather of an array of S bytes
sends (n-1)/n * S, a reduce-scatter of S bytes into n parts the same, an all-reduce (reduce-scatter
then all-gather) 2 (n-1)/n * S.

Per parameter of S bytes (in the dtype it is used in: kernels and the token table in the compute
dtype, since t5lite casts them before use; the float32 output layer and norm scales in float32),
sharded G ways over the batch axes (data, fsdp) and T ways over `tensor`, with R = data*fsdp / G
copies and M microbatches:

- FSDP (G > 1): all-gather before use, forward and again backward (ZeRO-3: nothing gathered is
  kept between them): 2 M (G-1)/G * S/T (once per microbatch for the token table when the logits do not
  reuse it: a lookup's gradient is a scatter-add that does not read the table); the gradient reduce-scattered into its shard every
  microbatch (the accumulators are sharded like the params): M (G-1)/G * S/T; the shard then
  all-reduced over its R copies once: 2 (R-1)/R * S/(G T).
- Data parallel (G = 1): the gradient all-reduced once over the R = data*fsdp copies, after
  accumulating microbatches locally: 2 (R-1)/R * S/T.
- Tensor parallelism (T > 1; Megatron, Shoeybi et al. 2019): each attention or MLP block
  all-reduces its [tokens, embed] output forward and its input gradient backward,
  2 (T-1)/T * tokens * embed * itemsize each; the cross-attention keys / values add one backward
  all-reduce of the encoder output per decoder layer. Tokens are this chip's: batch / (data*fsdp)
  rows times the stack's length. (The vocab-split loss and the gathered token table add a little
  more, not counted: the TP term is a lower bound.)

An eval step does the forward half: one all-gather per FSDP parameter, one all-reduce per block.

Memory: parameters (float32) + optimizer state + gradients (float32, sharded like the params) on
one chip against their ideal share, the totals split as many ways as the rules split a parameter
(fsdp * tensor: the data axis replicates by design, except under fsdp_2d).
"""

from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model import T5Config
from t5lite.train.partitioning import BATCH_MESH_AXES

OVER = 1.1  # emitted / minimum above this is flagged
_GIB = 2 ** 30
FLOAT32_KERNELS = ("logits_dense", "router")  # DenseGenerals t5lite runs in float32 (transformer.py, moe.py)


def _names(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _used_itemsize(name: str, leaf, compute_itemsize: int) -> int:
    """Bytes per element of a parameter as the step uses (gathers, differentiates) it."""
    cast = name.endswith("/kernel") or name.endswith("token_embedder/embedding")
    if cast and not any(part in name.split("/") for part in FLOAT32_KERNELS):
        return compute_itemsize
    return jnp.dtype(leaf.dtype).itemsize


def _split(sharding, mesh_shape: Dict[str, int]):
    """(G, T): how many ways a param is split over the batch axes and over the others."""
    g = t = 1
    for axes in tuple(sharding.spec):
        for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
            if axis in BATCH_MESH_AXES:
                g *= mesh_shape[axis]
            else:
                t *= mesh_shape[axis]
    return g, t


def _ring(n: int, factor: float = 1.0) -> float:
    return factor * (n - 1) / n if n > 1 else 0.0


def collectives_minimum(params, mesh_shape: Dict[str, int], config: T5Config, batch_size: int,
                        lengths: Dict[str, int], *, num_microbatches: int = 1, training: bool = True,
                        decoder_only: bool = False) -> Dict[str, float]:
    """{'all-gather', 'reduce-scatter', 'all-reduce', 'total'}: bytes one chip must send per step.

    `params`: ShapeDtypeStructs carrying their NamedShardings (the train state's params).
    """
    compute = jnp.dtype(config.dtype).itemsize
    batch_ways = int(np.prod([mesh_shape[a] for a in BATCH_MESH_AXES]))
    m = num_microbatches if training else 1
    sent = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        g, t = _split(leaf.sharding, mesh_shape)
        r = batch_ways // g
        name = _names(path)
        s = int(np.prod(leaf.shape)) * _used_itemsize(name, leaf, compute) / t  # [this tensor shard]
        lookup_only = name.endswith("token_embedder/embedding") and not config.logits_via_embedding
        sent["all-gather"] += (2 * m if training and not lookup_only else m) * _ring(g, s)
        if training:
            sent["reduce-scatter"] += m * _ring(g, s)
            sent["all-reduce"] += _ring(r, 2 * s / g)
    tensor = mesh_shape.get("tensor", 1)
    if tensor > 1:
        rows = batch_size / batch_ways
        per_token = config.emb_dim * compute
        enc_tokens = 0 if decoder_only else rows * lengths.get("inputs", 0)
        dec_tokens = rows * (lengths["targets"] + (lengths.get("inputs", 0) if decoder_only else 0))
        blocks = 2 * (0 if decoder_only else config.num_encoder_layers) * enc_tokens
        blocks += (2 if decoder_only else 3) * config.num_decoder_layers * dec_tokens
        directions = 2 if training else 1
        sent["all-reduce"] += _ring(tensor, 2 * per_token) * directions * blocks
        if training and not decoder_only:  # cross-attention K / V: input gradient onto the encoder output
            sent["all-reduce"] += _ring(tensor, 2 * per_token) * config.num_decoder_layers * enc_tokens
    return {**sent, "total": sum(sent.values())}


def memory_minimum(params, opt_state, mesh_shape: Dict[str, int]) -> Dict[str, float]:
    """Ideal bytes per chip of params, optimizer state and gradients: the totals split as many ways as the
    rules split any parameter (fsdp * tensor; data * fsdp * tensor under fsdp_2d)."""
    ways = max([int(np.prod(_split(leaf.sharding, mesh_shape))) for leaf in jax.tree.leaves(params)] or [1])

    def total(tree) -> float:
        return float(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    p, o = total(params), total(opt_state)
    return {"params": p / ways, "opt_state": o / ways, "grads": p / ways, "state": (p + o) / ways,
            "total": (2 * p + o) / ways}


def compare(emitted: dict, minimum: Dict[str, float]) -> dict:
    """Emitted (program_stats.collectives) vs minimum per kind and in total. `total_over`: the program
    sends more than 1.1x the minimum; `over`: then, the kinds whose excess is over 1 % of the minimum
    (XLA may swap one kind for another of equal bytes: an all-to-all of a lookup's gradient rows for
    the table's reduce-scatter; only the total is judged)."""
    rows = {}
    for kind in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"):
        got = emitted["by_kind"].get(kind, {}).get("sent", 0.0)
        want = minimum.get(kind, 0.0)
        rows[kind] = {"sent": got, "minimum": want, "ratio": (got / want) if want else None}
    ratio = emitted["sent"] / minimum["total"] if minimum["total"] else None
    total_over = ratio is not None and ratio > OVER
    over = [k for k, row in rows.items() if total_over and row["sent"] > OVER * row["minimum"]
            and row["sent"] - row["minimum"] > 0.01 * minimum["total"]]
    return {"by_kind": rows, "sent": emitted["sent"], "minimum": minimum["total"], "ratio": ratio,
            "over": over, "total_over": total_over}


def state_memory_ratio(arguments: Optional[float], batch_bytes_per_chip: float, ideal: Dict[str, float]):
    """XLA's argument bytes less the batch = params + optimizer state on one chip; / their ideal share."""
    if arguments is None or not ideal["state"]:
        return None
    return (arguments - batch_bytes_per_chip) / ideal["state"]


def plan(program: dict, state, mesh_shape: Dict[str, int], config: T5Config, batch_size: int,
         lengths: Dict[str, int], batch_per_chip: float, *, num_microbatches: int = 1, training: bool = True,
         decoder_only: bool = False) -> dict:
    """A compiled program's budget: its collectives against the minimum, its state memory against the ideal."""
    minimum = collectives_minimum(state.params, mesh_shape, config, batch_size, lengths,
                                  num_microbatches=num_microbatches, training=training, decoder_only=decoder_only)
    ideal = memory_minimum(state.params, state.opt_state, mesh_shape)
    # An eval step's arguments are the params and the batch: its state is the params alone.
    held = ideal if training else {**ideal, "opt_state": 0.0, "grads": 0.0, "state": ideal["params"]}
    return {"collectives": compare(program["collectives"], minimum), "memory_ideal": held,
            "state_memory_ratio": state_memory_ratio(program["memory"]["arguments"], batch_per_chip, held)}


def _size(n) -> str:
    return "?" if n is None else (f"{n / _GIB:.2f} GiB" if n >= _GIB / 10 else f"{n / 2 ** 20:.2f} MiB")


def report_lines(plan: dict) -> List[str]:
    """The two lines `t5lite compile` prints under a program's collectives."""
    coll = plan["collectives"]
    kinds = ", ".join(f"{kind} {_size(row['sent'])} / {_size(row['minimum'])}" for kind, row in coll["by_kind"].items()
                      if row["sent"] or row["minimum"])
    ratio = "-" if coll["ratio"] is None else f"{coll['ratio']:.2f}x"
    flag = f"  OVER {OVER}x ({', '.join(coll['over']) or 'total'})" if coll["total_over"] else ""
    lines = [f"  sent/chip/step vs analytic minimum (ring): {kinds or 'none'}; total {_size(coll['sent'])} / "
             f"{_size(coll['minimum'])} = {ratio}{flag}"]
    ideal, ratio = plan["memory_ideal"], plan["state_memory_ratio"]
    state = "?" if ratio is None else f"{ratio:.2f}x"
    mark = f"  OVER {OVER}x" if ratio is not None and ratio > OVER else ""
    lines.append(f"  state memory/chip vs ideal share: params + optimizer state {state} of {_size(ideal['state'])} "
                 f"(params {_size(ideal['params'])}, optimizer {_size(ideal['opt_state'])}; gradients, sharded like "
                 f"the params: {_size(ideal['grads'])}){mark}")
    return lines
