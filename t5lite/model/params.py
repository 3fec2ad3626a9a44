"""Parameter-tree utilities: abstract shapes, counts, logical axes and scan-layout conversion.

Scanned models store each stack's layers as one tree with a leading `layers` axis
(`encoder/layers/...`); unscanned ones as `encoder/layers_0/...`, `layers_1/...`. Stacks
scanned in blocks of k layers (an MoE MLP every k-th layer) hold `encoder/layers/layer_j/...`
for j < k, with layer i at [i // k] of `layer_{i % k}`. The conversion is a pure restacking,
so the same weights give the same logits in either layout.
"""

import re
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model.config import T5Config
from t5lite.model.transformer import DecoderOnly, EncoderDecoder

Params = Dict[str, Any]
_STACKS = ("encoder", "decoder")


def model_class(decoder_only: bool = False):
    return DecoderOnly if decoder_only else EncoderDecoder


def dummy_inputs(config: T5Config, decoder_only: bool = False, batch: int = 1, length: int = 8) -> dict:
    tokens = jnp.ones((batch, length), jnp.int32)
    if decoder_only:
        return dict(decoder_input_tokens=tokens)
    return dict(encoder_input_tokens=tokens, decoder_input_tokens=tokens)


def init_params(config: T5Config, rng: jax.Array, decoder_only: bool = False) -> Params:
    """Randomly initialised, unboxed float32 parameters."""
    variables = model_class(decoder_only)(config).init(rng, **dummy_inputs(config, decoder_only))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: T5Config, decoder_only: bool = False) -> Params:
    """Boxed (logically annotated) ShapeDtypeStructs, computed without allocating memory."""
    model = model_class(decoder_only)(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config, decoder_only)))
    return variables["params"]


def logical_axes(config: T5Config, decoder_only: bool = False) -> Params:
    """The tree of logical axis names (PartitionSpecs of names like 'embed', 'mlp') per parameter."""
    return nn.get_partition_spec(abstract_params(config, decoder_only))


def param_shapes(params: Params) -> Dict[str, list]:
    """{'encoder/layers_0/mlp/wi_0/kernel': [512, 1024], ...} for golden files and error messages."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    return {"/".join(k.key for k in path): list(leaf.shape) for path, leaf in flat}


def count_params(params: Params) -> int:
    return int(sum(np.prod(shape) for shape in param_shapes(params).values()))


def unscan_params(params: Params) -> Params:
    """encoder/layers/<leaf [N, ...]>  ->  encoder/layers_i/<leaf [...]> for each stack (blocks too)."""
    params = dict(params)
    for stack in _STACKS:
        if stack not in params or "layers" not in params[stack]:
            continue
        tree = dict(params[stack])
        stacked = tree.pop("layers")
        blocks = sorted(k for k in stacked if re.fullmatch(r"layer_\d+", k))
        block = [stacked[f"layer_{j}"] for j in range(len(blocks))] if blocks else [stacked]
        num_steps = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(num_steps * len(block)):
            step = i // len(block)
            tree[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, step=step: x[step], block[i % len(block)])
        params[stack] = tree
    return params


def scan_params(params: Params, layers_per_block: int = 1) -> Params:
    """encoder/layers_i/<leaf>  ->  encoder/layers/<leaf stacked on a new leading axis>.

    `layers_per_block` > 1 (T5Config.layers_per_scan_block) stacks blocks of that many layers.
    """
    params = dict(params)
    for stack in _STACKS:
        if stack not in params:
            continue
        tree = dict(params[stack])
        names = sorted((k for k in tree if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))
        if not names:
            continue
        layers = [tree.pop(k) for k in names]
        stack_of = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
        if layers_per_block == 1:
            tree["layers"] = stack_of(layers)
        else:
            tree["layers"] = {f"layer_{j}": stack_of(layers[j::layers_per_block]) for j in range(layers_per_block)}
        params[stack] = tree
    return params


def flat_paths(tree, prefix: str = "") -> Dict[str, np.ndarray]:
    """{"encoder/layers_0/mlp/wo/kernel": leaf, ...} of a nested dict (the inverse of nest_paths)."""
    out = {}
    for key, value in tree.items():
        out.update(flat_paths(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def nest_paths(flat: Dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


_ATTENTION_KERNEL = re.compile(r"(?:^|/)(query|key|value|out)/kernel$")


def attention_in_layout(params: Params, config: T5Config) -> Params:
    """Params whose attention kernels are in either layout -> in `config.attention_layout` (a reshape: both
    layouts hold the same matrix in the same order), so checkpoints saved in the other layout load.
    Scanned kernels keep their leading layers axis."""
    other = config.replace(attention_layout="split" if config.attention_layout == "joined" else "joined")
    flat = flat_paths(params)
    for path, kernel in flat.items():
        match = _ATTENTION_KERNEL.search(path)
        if match is None:
            continue
        heads = config.kv_heads if match.group(1) in ("key", "value") else config.num_heads
        wanted, stored = (c.attention_kernel_shape(heads, out=match.group(1) == "out") for c in (config, other))
        if tuple(kernel.shape[-len(wanted):]) != wanted and tuple(kernel.shape[-len(stored):]) == stored:
            flat[path] = jnp.reshape(kernel, tuple(kernel.shape[:-len(stored)]) + wanted)
    return nest_paths(flat)
