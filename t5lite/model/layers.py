"""Building blocks: token embedding, dense projections, the norms and the (gated) MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
t5lite/train/partitioning.py alone decides how it is laid out on a device mesh. Parameters
are float32; `dtype` is the compute dtype. Names follow T5X, so checkpoints read alike.
The norms and the MLP are registered (t5lite/registry.py) under the names that
`T5Config.norm` and `T5Config.mlp` select.
"""

from typing import Callable, Sequence, Tuple, Union

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


def _canonical(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nn.Module):
    """A bias-free projection contracting the last `len(in_features)` axes of the input.

    `features` may be a tuple, e.g. (heads, head_dim), giving a multi-axis kernel
    [*in_features, *features] whose logical names are `kernel_axes`.
    """

    features: Union[int, Tuple[int, ...]]
    kernel_axes: Axes
    num_contracting: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _canonical(self.features)
        n_in = self.num_contracting
        in_shape = x.shape[-n_in:]
        kernel_shape = tuple(in_shape) + features
        # fan_in / fan_out for variance scaling are the products over the in / out axes.
        kernel = self.param("kernel", nn.with_logical_partitioning(_flat_init(self.kernel_init, n_in), self.kernel_axes),
                            kernel_shape, jnp.float32)
        kernel = jnp.asarray(kernel, self.dtype)
        x = jnp.asarray(x, self.dtype)
        # One 2D matmul [tokens, in] @ [in, out]. Contracting a [B, L, D] input directly, XLA's CPU
        # backend computes the backward through strided transposed copies of the activation
        # gradients; the flat form has none (t5_1_1_small's train step: -20% time, same numbers).
        fan_in = int(np.prod(in_shape))
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
        table = nn.with_logical_constraint(jnp.asarray(self.embedding, self.dtype), (None, None))  # [V, D]
        x = jnp.take(table, ids, axis=0)  # [B, L, D]
        return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, L, D] -> x @ embedding.T [B, L, V]."""
        return jnp.einsum("bld,vd->blv", jnp.asarray(x, self.dtype), jnp.asarray(self.embedding, self.dtype))


@register("norm", "rms_norm")
class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32.

    `axis_name` is the logical name of the normalised dim ('kv' when it normalises attention heads).
    """

    config: T5Config
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon) * scale
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
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon) * scale + bias
        return jnp.asarray(y, self.config.dtype)


@register("norm", "gemma_rms_norm")
class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: T5's, but the stored scale w multiplies as (1 + w) (zeros at init); float32."""

    config: T5Config
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon) * (1.0 + scale)
        return jnp.asarray(y, self.config.dtype)


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
