"""LoRA "cards": low-rank updates of chosen projections, kept apart from the frozen base model.

A projection y = x W (a DenseGeneral whose module path matches one of `LoraConfig.targets`)
becomes y = x W + (alpha / r) * dropout(x) A B, with A [*in, r] random and B [r, *out] zero,
so a fresh card changes no output (Hu et al. 2021; HF PEFT's initialisation and scaling).

The model code does not know about cards. `adapted(spec)` is a flax method interceptor: while
it is active, every matching DenseGeneral adds its low-rank term, reading A and B from the
'lora' collection at the module's own path (`encoder/layers_0/attention/query/lora_a`), so
a card is a small tree beside the base params, with the kernels' logical axis names (it
shards like the base) and the `layers` axis of scanned stacks. `adapted(spec, card_index=i)`
serves many cards at once: each 'lora' leaf holds a table of cards [C, ...], example n uses
card i[n] (gathered A and B, as Punica / S-LoRA do), and i[n] < 0 means the base alone.
"""

import contextlib
import dataclasses
import hashlib
import math
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.errors import UserError
from t5lite.model.config import T5Config
from t5lite.model.layers import DenseGeneral
from t5lite.model.params import (attention_in_layout, dummy_inputs, flat_paths, model_class, nest_paths,
                                 scan_params, unscan_params)

COLLECTION = "lora"
# PEFT's names of T5's projections, as aliases of t5lite's module names.
_ALIASES = {"q": "query", "k": "key", "v": "value", "o": "out", "wi": r"wi(?:_\d+)?"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A card's shape: rank r, scale alpha / r, dropout on the card's input, and the projections it adapts.

    `targets` are module names matched at the end of a projection's path: PEFT's q, k, v, o, wi, wo
    (every self- and cross-attention, every MLP), t5lite's own names (query, key, value, out, wi_0,
    wi_1, wo) or regular expressions such as 'encoder_decoder_attention/query' (cross-attention only)
    or 'encoder/.*/value'. Defaults are PEFT's for T5: r = 8, alpha = 8, targets q and v.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple([self.targets] if isinstance(self.targets, str) else self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise UserError("LoraConfig.targets is empty; name the projections to adapt, e.g. ('q', 'v')")
        for target in self.targets:
            try:
                re.compile(_ALIASES.get(target, target))
            except re.error as e:
                raise UserError(f"LoraConfig target {target!r} is not a valid regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        """Whether the projection at module path `path` ('decoder/layers_1/self_attention/query') is adapted."""
        return any(re.search(rf"(?:^|/)(?:{_ALIASES.get(t, t)})$", path) for t in self.targets)

    def to_dict(self) -> dict:
        return dict(rank=self.rank, alpha=float(self.alpha), dropout=float(self.dropout), targets=list(self.targets))

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d["targets"]))


# ---------------------------------------------------------------------------------------------
# The interceptor.
# ---------------------------------------------------------------------------------------------

def _module_path(module: nn.Module) -> str:
    return "/".join(module.path)


def _adaptable(module: nn.Module) -> bool:
    """A projection a card may adapt: every DenseGeneral except those of mixture-of-experts experts (stacked
    by nn.vmap; a per-expert card is not supported), so 'wi' / 'wo' adapt the dense MLPs of an MoE model."""
    return isinstance(module, DenseGeneral) and "expert" not in module.path


def _uniform_fan_in(key, shape, fan_in: int):
    """PEFT's A init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _card_variables(module: DenseGeneral, in_shape: Tuple[int, ...], rank: int):
    """(A, B) of this projection: created when initialising a card, read otherwise (None if the card has none)."""
    n_in = module.num_contracting
    in_axes, out_axes = tuple(module.kernel_axes[:n_in]), tuple(module.kernel_axes[n_in:])
    out_shape = (module.features,) if isinstance(module.features, int) else tuple(module.features)
    if module.is_initializing() and module.is_mutable_collection(COLLECTION):
        fan_in = int(np.prod(in_shape))
        a = module.variable(COLLECTION, "lora_a", nn.with_logical_partitioning(
            lambda: _uniform_fan_in(module.make_rng("params"), in_shape + (rank,), fan_in), in_axes + (None,)))
        b = module.variable(COLLECTION, "lora_b", nn.with_logical_partitioning(
            lambda: jnp.zeros((rank,) + out_shape, jnp.float32), (None,) + out_axes))
        return a.value, b.value
    if not module.has_variable(COLLECTION, "lora_a"):
        return None
    return module.get_variable(COLLECTION, "lora_a"), module.get_variable(COLLECTION, "lora_b")


def _low_rank_update(module: DenseGeneral, x: jax.Array, spec: LoraConfig, card_index: Optional[jax.Array],
                     card_scales: Optional[jax.Array], deterministic: bool) -> Optional[jax.Array]:
    """(alpha / r) * dropout(x) A B for one projection, per example when `card_index` is given."""
    n_in = module.num_contracting
    ab = _card_variables(module, tuple(x.shape[-n_in:]), spec.rank)
    if ab is None:
        return None
    dtype = jnp.dtype(module.dtype)
    a, b = (jnp.asarray(v, dtype) for v in ab)
    x = jnp.asarray(x, dtype)
    if spec.dropout > 0 and not deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(dtype)
    lead = x.shape[:-n_in]  # [B, L]
    x = x.reshape(lead + (-1,))  # [B, L, I]
    if card_index is None:
        h = x @ a.reshape(-1, a.shape[-1])  # [B, L, r]
        out = (h @ b.reshape(b.shape[0], -1)) * jnp.asarray(spec.scale, dtype)  # [B, L, O]
        return out.reshape(lead + b.shape[1:])
    # A table of cards [C, *in, r], [C, r, *out]: each example gathers its own (index < 0: none).
    rows = jnp.maximum(card_index, 0)  # [B]
    a_n = jnp.take(a.reshape(a.shape[0], -1, a.shape[-1]), rows, axis=0)  # [B, I, r]
    b_n = jnp.take(b.reshape(b.shape[0], b.shape[1], -1), rows, axis=0)  # [B, r, O]
    scale = jnp.where(card_index >= 0, jnp.take(card_scales, rows), 0.0).astype(dtype)  # [B]
    h = jnp.einsum("b...i,bir->b...r", x, a_n)
    out = jnp.einsum("b...r,bro->b...o", h, b_n) * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return out.reshape(lead + b.shape[2:])


@contextlib.contextmanager
def adapted(spec: LoraConfig, card_index: Optional[jax.Array] = None, card_scales: Optional[jax.Array] = None,
            deterministic: bool = True):
    """Within this context, model.apply / init add the card's low-rank term to every projection `spec` targets.

    One card: the 'lora' collection holds A, B per projection. A table of C cards: leaves [C, ...],
    `card_index` [B] (int, < 0 for the base alone) and `card_scales` [C] (each card's alpha / r).
    `deterministic=False` applies the card's dropout (needs a 'dropout' rng).
    """

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not _adaptable(module) or not spec.matches(_module_path(module)):
            return y
        update = _low_rank_update(module, args[0], spec, card_index, card_scales, deterministic)
        return y if update is None else y + update.astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield


# ---------------------------------------------------------------------------------------------
# Cards as trees.
# ---------------------------------------------------------------------------------------------

def _init_variables(config: T5Config, spec: LoraConfig, rng: jax.Array, decoder_only: bool):
    model = model_class(decoder_only)(config)
    with adapted(spec):
        return model.init(rng, **dummy_inputs(config, decoder_only))


def projections(config: T5Config, decoder_only: bool = False) -> List[str]:
    """Module paths of every projection a card can adapt (what a target can name), traced without memory."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if _adaptable(context.module) and context.method_name == "__call__":
            seen.append(_module_path(context.module))
        return next_fun(*args, **kwargs)

    model = model_class(decoder_only)(config)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config, decoder_only)))
    return list(dict.fromkeys(seen))


def check_targets(spec: LoraConfig, config: T5Config, decoder_only: bool = False) -> None:
    """Every target names at least one projection of this model (a typo must not train an empty card)."""
    paths = projections(config, decoder_only)
    for target in spec.targets:
        if not any(LoraConfig(targets=(target,)).matches(p) for p in paths):
            names = sorted({p.rsplit("/", 1)[-1] for p in paths})
            raise UserError(f"LoraConfig target {target!r} matches no projection of this model; projections are "
                            f"named {', '.join(names)} (PEFT's q, k, v, o, wi, wo work too), or give a pattern like "
                            "'encoder_decoder_attention/query'")


def abstract_card(config: T5Config, spec: LoraConfig, decoder_only: bool = False):
    """Boxed (logically annotated) ShapeDtypeStructs of a card, without allocating the base."""
    return jax.eval_shape(lambda: _init_variables(config, spec, jax.random.key(0), decoder_only))[COLLECTION]


def init_card(config: T5Config, spec: LoraConfig, rng: jax.Array, decoder_only: bool = False) -> dict:
    """A fresh card (A random, B zero), unboxed. Call it under jit: the base's init is dead code there."""
    return nn.meta.unbox(_init_variables(config, spec, rng, decoder_only)[COLLECTION])


def num_card_params(card) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(card)))


def in_layout(card: dict, config: T5Config) -> dict:
    """A card stored unscanned (cards on disk always are) in the layer layout of `config`."""
    return scan_params(card, config.layers_per_scan_block) if config.scan_layers else card


def merge(params: dict, card: dict, spec: LoraConfig) -> dict:
    """The base with the card folded in, W + (alpha / r) A B, for params and card in the same layout."""
    flat_params, flat_card = flat_paths(params), flat_paths(card)
    merged = dict(flat_params)
    for path, a in flat_card.items():
        if not path.endswith("/lora_a"):
            continue
        module = path[:-len("/lora_a")]
        kernel, b = flat_params[f"{module}/kernel"], flat_card[f"{module}/lora_b"]
        lead = 1 if "layers" in module.split("/") else 0  # scanned stacks (".../layers/...") lead with layers
        a2 = jnp.reshape(a, a.shape[:lead] + (-1, a.shape[-1]))  # [..., I, r]
        b2 = jnp.reshape(b, b.shape[:lead + 1] + (-1,))  # [..., r, O]
        merged[f"{module}/kernel"] = kernel + (a2 @ b2).reshape(kernel.shape) * spec.scale
    return nest_paths(merged)


class CardTable(NamedTuple):
    """Cards stacked for one batch: the spec that serves them all, leaves [C, ...], each card's alpha / r."""

    spec: LoraConfig
    table: dict
    scales: np.ndarray  # [C] float32


def stack_cards(cards: Sequence[Tuple[LoraConfig, dict]], config: T5Config) -> CardTable:
    """Unscanned cards -> a CardTable whose leaves [C, ...] are in `config`'s layer layout. Ranks are zero-padded to the largest; a projection a card does not adapt
    gets zeros in that card's row, so the table covers the union of the targets."""
    rank = max(spec.rank for spec, _ in cards)
    flats = [flat_paths(card) for _, card in cards]
    table = {}
    for path in sorted(set().union(*flats)):
        like = next(f[path] for f in flats if path in f)
        is_a = path.endswith("/lora_a")
        shape = like.shape[:-1] + (rank,) if is_a else (rank,) + like.shape[1:]
        rows = []
        for flat in flats:
            row = np.zeros(shape, np.float32)
            if path in flat:
                value = np.asarray(flat[path], np.float32)
                row[(..., slice(0, value.shape[-1])) if is_a else slice(0, value.shape[0])] = value
            rows.append(row)
        table[path] = np.stack(rows)
    targets = tuple(dict.fromkeys(t for spec, _ in cards for t in spec.targets))
    union = LoraConfig(rank=rank, alpha=float(rank), targets=targets)  # scales come from the table
    scales = np.array([spec.scale for spec, _ in cards], np.float32)
    return CardTable(union, in_layout(nest_paths(table), config), scales)


# ---------------------------------------------------------------------------------------------
# The base's fingerprint.
# ---------------------------------------------------------------------------------------------

FINGERPRINT_SAMPLES = 256


def fingerprint(params: dict, config: T5Config) -> str:
    """Identifies a base model: sha256 over every tensor's path, shape and FINGERPRINT_SAMPLES values at
    evenly spaced positions, in the unscanned layout with split attention kernels (so scanned and unscanned
    copies, in either attention layout (`config`'s), on any mesh, agree, and cards saved before the joined
    layout keep their base's fingerprint).

    Cheap on any size (a gather of a few values per tensor, no full pass) and exact (no float sums that
    depend on reduction order). It tells apart other models and other trainings of the same model; an
    edit of a few weights that misses every sampled position would go unnoticed.
    """
    split = config.replace(attention_layout="split")
    canonical = lambda p: attention_in_layout(unscan_params(p), split)  # noqa: E731
    shapes = jax.eval_shape(canonical, params)

    def sample(x):
        flat = jnp.reshape(x, (-1,))
        return flat[np.linspace(0, flat.shape[0] - 1, min(FINGERPRINT_SAMPLES, flat.shape[0])).astype(np.int64)]

    samples = jax.jit(lambda p: jax.tree.map(sample, canonical(p)))(params)
    digest = hashlib.sha256()
    flat_shapes, flat_samples = flat_paths(shapes), flat_paths(jax.device_get(samples))
    for path in sorted(flat_shapes):
        digest.update(f"{path}:{tuple(flat_shapes[path].shape)};".encode())
        digest.update(np.asarray(flat_samples[path], np.float32).tobytes())
    return digest.hexdigest()[:20]
