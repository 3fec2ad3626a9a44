"""TrainState: everything a checkpoint must hold to continue training.

Its own module so that partitioning (which shards it) and step (which updates it) both import
it without importing each other.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """The step, params and optimizer state; a pytree, so jit shards and donates it whole."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any  # unboxed float32 parameter tree
    opt_state: Any  # optax state; its param-shaped leaves are sharded like params

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
