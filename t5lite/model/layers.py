"""Building blocks: token embedding, dense projections, the norms and the (gated) MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
t5lite/train/partitioning.py alone decides how it is laid out on a device mesh. Parameters
are float32; `dtype` is the compute dtype. Names follow T5X, so checkpoints read alike.
The norms and the MLP are registered (t5lite/registry.py) under the names that
`T5Config.norm` and `T5Config.mlp` select.
"""

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model.config import ACTIVATIONS, T5Config
from t5lite.registry import register

Axes = Tuple[str, ...]
Initializer = Callable[..., jax.Array]

# Logical axis names of the residual stream, used for activation sharding constraints.
BATCH_LENGTH_EMBED = ("batch", "length", "embed")


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) for float x: the first index of the maximum (or of a NaN, like argmax), int32.

    Why not jnp.argmax: XLA:CPU lowers it to a variadic (value, index) reduce that it does not
    vectorise; two plain reductions are ~8x faster on [32, 32128] logits (0.56 vs 4.7 ms on one
    core), the greedy decoding step's second-largest cost after the logits matmul.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    hit = (x == top) | jnp.isnan(x)  # a NaN makes `top` NaN: then the first NaN wins, as in argmax
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sharded_grad(w: jax.Array, axes: Axes, gather: bool = False) -> jax.Array:
    """Identity on a parameter as used (after the cast to the compute dtype; with `gather`, also made
    whole on every device); its gradient is laid out like the parameter, `axes`, where it is computed.

    Under FSDP a weight's gradient is a sum over the batch, which each chip holds a slice of; it should
    leave the backward pass reduce-scattered into the weight's shards. XLA:TPU reduce-scatters only
    along a gradient's major dim, and not a 3-D one whose minor dims fill no (8, 128) tile: `wo`
    [mlp, embed], the attention kernels and the token table were all-reduced at full size, per layer,
    then sliced. So the gradient is constrained as [split dim, everything else] (a transpose and a
    reshape XLA folds away), then given back its shape and layout. Split over two mesh axes
    (`fsdp_2d`), it is reduce-scattered over the minor axis first, then the other: two rings, where
    XLA:TPU would turn one reduce-scatter over more than 8 chips into an all-reduce. The token table's
    `gather` replaces a forward constraint whose transpose made its gradient replicated (an all-reduce).
    Outside a mesh + rules context (one device) this is the identity.
    """
    return _gathered(w, gather)


def _gathered(w, gather):
    return nn.with_logical_constraint(w, (None,) * w.ndim) if gather else w


def _sharded_grad_fwd(w, axes, gather):
    return _gathered(w, gather), None


def _split_axes(axes: Axes, shape) -> Tuple[Tuple, Optional[int]]:
    """(`axes` with None for each dim the current rules do not shard or whose mesh axes do not divide
    it, as partitioning._fit replicates those dims of the parameter; the first dim split over the
    mesh axes of the logical 'batch' axis, i.e. the dim the gradient is reduce-scattered along)."""
    rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return (None,) * len(axes), None
    batch_axes = set(_names(nn.logical_to_mesh_axes(("batch",), rules)[0]))
    fitted, scattered = [], None
    for i, (name, mesh_axes, dim) in enumerate(zip(axes, nn.logical_to_mesh_axes(axes, rules), shape)):
        names = _names(mesh_axes)
        fits = bool(names) and dim % int(np.prod([mesh.shape[a] for a in names])) == 0
        fitted.append(name if fits else None)
        if fits and scattered is None and batch_axes & set(names):
            scattered = i
    return tuple(fitted), scattered


def _names(mesh_axes) -> Tuple[str, ...]:
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())


def _sharded_grad_bwd(axes, gather, _, g):
    axes, split = _split_axes(axes, g.shape)
    if all(a is None for a in axes):  # replicated: the gradient is all-reduced, whatever we say
        return (g,)
    if gather and any(a is not None for i, a in enumerate(axes) if i != split):
        # A lookup table also split over `tensor` (vocab): XLA has no sharded scatter-add of batch-split
        # rows into it (it would replicate the rows, "involuntary full rematerialization"); all-reduce.
        return (nn.with_logical_constraint(g, (None,) * g.ndim),)
    if split is not None:
        # [scattered, rest]: XLA:TPU reduce-scatters along the major dim only, and not a 3-D gradient whose
        # minor dims do not fill its (8, 128) tiles (an attention kernel's [heads, kv = 64]); 2-D, it does.
        moved = jnp.moveaxis(g, split, 0)
        flat = jnp.reshape(moved, (moved.shape[0], -1))  # [scattered, prod(rest)]
        mesh_axes = _names(nn.logical_to_mesh_axes((axes[split],))[0])
        # Split over several mesh axes (fsdp_2d): one ring at a time, the minor axis first. Not for a lookup
        # table's gradient: XLA scatters its rows by an all-to-all, which has no such two-step form.
        if len(mesh_axes) > 1 and not gather:
            flat = jax.lax.with_sharding_constraint(flat, jax.sharding.PartitionSpec(mesh_axes[-1], None))
        flat = nn.with_logical_constraint(flat, (axes[split], None))
        g = jnp.moveaxis(jnp.reshape(flat, moved.shape), 0, split)
    return (nn.with_logical_constraint(g, axes),)


sharded_grad.defvjp(_sharded_grad_fwd, _sharded_grad_bwd)


def _canonical(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nn.Module):
    """A bias-free projection contracting the last `len(in_features)` axes of the input.

    `features` may be a tuple, e.g. (heads, head_dim), giving a multi-axis kernel
    [*in_features, *features] whose logical names are `kernel_axes`. With `joined_axes` (two names) the
    kernel is stored as the 2D [prod(in_features), prod(features)] instead: the same matrix in the same
    row-major order (a reshape apart, same initial values), whose shards stay whole memory tiles.
    """

    features: Union[int, Tuple[int, ...]]
    kernel_axes: Axes
    num_contracting: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    joined_axes: Optional[Axes] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _canonical(self.features)
        n_in = self.num_contracting
        in_shape = x.shape[-n_in:]
        fan_in = int(np.prod(in_shape))
        if self.joined_axes is not None:
            kernel_shape, axes, n_in_stored = (fan_in, int(np.prod(features))), self.joined_axes, 1
        else:
            kernel_shape, axes, n_in_stored = tuple(in_shape) + features, self.kernel_axes, n_in
        # fan_in / fan_out for variance scaling are the products over the in / out axes.
        kernel = self.param("kernel", nn.with_logical_partitioning(_flat_init(self.kernel_init, n_in_stored), axes),
                            kernel_shape, jnp.float32)
        kernel = sharded_grad(jnp.asarray(kernel, self.dtype), axes)  # [*in, *features] or [in, features]
        x = jnp.asarray(x, self.dtype)
        # One 2D matmul [tokens, in] @ [in, out]. Contracting a [B, L, D] input directly, XLA's CPU
        # backend computes the backward through strided transposed copies of the activation
        # gradients; the flat form has none (t5_1_1_small's train step: -20% time, same numbers).
        y = jnp.reshape(x, (-1, fan_in)) @ jnp.reshape(kernel, (fan_in, -1))  # [B * L, prod(features)]
        return jnp.reshape(y, x.shape[:-n_in] + features)


def _flat_init(init: Initializer, n_in: int) -> Initializer:
    """Runs a 2D initializer on the kernel flattened to [prod(in), prod(out)], then reshapes."""

    def flat(key, shape, dtype=jnp.float32):
        flat_shape = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
        return jnp.reshape(init(key, flat_shape, dtype), shape)

    return flat


class Embed(nn.Module):
    """Token embedding [vocab, embed]; `attend` reuses it as the output projection (tied logits)."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from the whole table, like FSDP gathers every weight before use: XLA has no sharded
        # gather from a table split over vocab / embed into rows split over batch, and would replicate
        # the result and its gradient instead ("involuntary full rematerialization" under FSDP + TP).
        table = sharded_grad(jnp.asarray(self.embedding, self.dtype), ("vocab", "embed"), True)  # [V, D]
        x = jnp.take(table, ids, axis=0)  # [B, L, D]
        return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, L, D] -> x @ embedding.T [B, L, V]."""
        table = sharded_grad(jnp.asarray(self.embedding, self.dtype), ("vocab", "embed"))  # [V, D]
        return jnp.einsum("bld,vd->blv", jnp.asarray(x, self.dtype), table)


@register("norm", "rms_norm")
class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32.

    `axis_name` is the logical name of the normalised dim ('kv' when it normalises attention heads).
    """

    config: T5Config
    axis_name: str = "embed"
    scale_init = 1.0  # the stored scale w starts here and multiplies as scale_offset + w
    scale_offset = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        init = nn.initializers.constant(self.scale_init)
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (x.shape[-1],), jnp.float32)
        scale = sharded_grad(scale, (self.axis_name,))
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon) * (self.scale_offset + scale)
        return jnp.asarray(y, self.config.dtype)


@register("norm", "layer_norm")
class LayerNorm(nn.Module):
    """The original Transformer's norm: subtract the mean, divide by the std, scale and shift; float32."""

    config: T5Config
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        axes = (self.axis_name,)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes), (x.shape[-1],),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), (x.shape[-1],),
                          jnp.float32)
        scale, bias = sharded_grad(scale, axes), sharded_grad(bias, axes)
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon) * scale + bias
        return jnp.asarray(y, self.config.dtype)


@register("norm", "gemma_rms_norm")
class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: T5's, but the stored scale w multiplies as (1 + w) (zeros at init); float32."""

    scale_init = 0.0
    scale_offset = 1.0


def gate(hidden: Sequence[jax.Array], activations: Tuple[str, ...]) -> jax.Array:
    """prod_i act_i(hidden_i): one activation is a plain MLP, several a gated one (GLU variants)."""
    out = None
    for h, act in zip(hidden, activations):
        h = ACTIVATIONS[act](h)
        out = h if out is None else out * h
    return out


def mlp_input_names(activations: Tuple[str, ...]) -> Tuple[str, ...]:
    """T5X's names of the input projections: 'wi' alone, or wi_0, wi_1, ... when gated."""
    return ("wi",) if len(activations) == 1 else tuple(f"wi_{i}" for i in range(len(activations)))


@register("mlp", "dense")
class MlpBlock(nn.Module):
    """Position-wise MLP. One activation: wo(act(wi x)); several: wo(prod_i act_i(wi_i x)) (gated)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        emb_dim = x.shape[-1]
        hidden = gate([DenseGeneral(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, name=name)(x)
                       for name in mlp_input_names(cfg.mlp_activations)], cfg.mlp_activations)  # [B, L, F]
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        return DenseGeneral(emb_dim, ("mlp", "embed"), dtype=dtype, name="wo")(hidden)

    @staticmethod
    def macs_per_token(config: T5Config) -> int:
        """Multiply-adds per token (for FLOP counts): the input projections and wo."""
        return (len(config.mlp_activations) + 1) * config.emb_dim * config.mlp_dim
