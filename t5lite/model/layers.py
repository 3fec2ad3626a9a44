"""Building blocks: token embedding, dense projections, RMSNorm and the (gated) MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
t5lite/train/partitioning.py alone decides how it is laid out on a device mesh. Parameters
are float32; `dtype` is the compute dtype. Names follow T5X, so checkpoints read alike.
"""

from typing import Callable, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))


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


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.epsilon) * scale
        return jnp.asarray(y, self.dtype)


ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    # T5 v1.1's "gelu" is the tanh approximation (HF calls it gelu_new).
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": lambda x: x,
}


class MlpBlock(nn.Module):
    """Position-wise MLP. One activation: wo(act(wi x)); several: wo(prod_i act_i(wi_i x)) (gated)."""

    mlp_dim: int
    activations: Tuple[str, ...] = ("relu",)
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        emb_dim = x.shape[-1]
        hidden = None
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = DenseGeneral(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name=name)(x)
            h = ACTIVATION_FNS[act](h)
            hidden = h if hidden is None else hidden * h  # [B, L, F]
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return DenseGeneral(emb_dim, ("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)
