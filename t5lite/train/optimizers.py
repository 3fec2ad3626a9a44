"""Optimizers and learning-rate schedules: T5's Adafactor + rsqrt, and AdamW + cosine.

`make_optimizer(name, schedule, ...)` takes plain keyword arguments (so gin can bind them)
and returns an `Optimizer`: an optax transformation (`init` / `update`) that also carries its
`learning_rate_fn`, so the train step can report the learning rate of every step. Every
optimizer here is plain optax, so its state is a pytree whose param-shaped parts can be
sharded like the parameters (t5lite/train/partitioning.py).
"""

import inspect
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from t5lite.errors import UserError

Schedule = Callable[[jax.Array], jax.Array]  # step (int32 scalar) -> learning rate (float32 scalar)


class Optimizer(NamedTuple):
    """An optax GradientTransformation plus the schedule it uses (duck-types as optax's)."""

    init: Callable
    update: Callable
    learning_rate_fn: Schedule


# ---------------------------------------------------------------------------------------------
# Schedules. Each is a pure function of the step, so a resumed run gets the same values.
# ---------------------------------------------------------------------------------------------

def rsqrt_schedule(learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5's schedule: lr = learning_rate / sqrt(max(step, warmup_steps)).

    Constant at learning_rate / sqrt(warmup_steps) for the first warmup_steps steps, then an
    inverse-square-root decay. T5 pre-training uses learning_rate=1.0, warmup_steps=10_000
    (0.01 for 10k steps) with Adafactor.
    """
    if warmup_steps < 1:
        raise UserError(f"rsqrt schedule needs warmup_steps >= 1, got {warmup_steps}; T5 uses 10000")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))

    return schedule


def cosine_schedule(learning_rate: float, warmup_steps: int, total_steps: int,
                    end_learning_rate: float = 0.0) -> Schedule:
    """Linear warmup 0 -> learning_rate over warmup_steps, then cosine decay to end_learning_rate
    at total_steps (constant after): lr = end + (peak - end) * (1 + cos(pi * progress)) / 2."""
    if total_steps is None or total_steps <= warmup_steps:
        raise UserError(f"cosine schedule needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}; "
                        "set total_steps to the length of the run")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end_learning_rate)


def constant_schedule(learning_rate: float, warmup_steps: int = 0) -> Schedule:
    """learning_rate after an optional linear warmup from 0 (T5 fine-tuning: 1e-3, no warmup)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps <= 0:
            return jnp.full((), learning_rate, jnp.float32)
        return learning_rate * jnp.minimum(1.0, step / warmup_steps)

    return schedule


def make_schedule(schedule: str = "rsqrt", learning_rate: float = 1.0, warmup_steps: int = 10_000,
                  total_steps: Optional[int] = None, end_learning_rate: float = 0.0) -> Schedule:
    """The schedule called `schedule` ('rsqrt', 'cosine' or 'constant')."""
    if schedule == "rsqrt":
        return rsqrt_schedule(learning_rate, warmup_steps)
    if schedule == "cosine":
        return cosine_schedule(learning_rate, warmup_steps, total_steps, end_learning_rate)
    if schedule == "constant":
        return constant_schedule(learning_rate, warmup_steps)
    raise UserError(f"unknown learning-rate schedule {schedule!r}; choose from rsqrt, cosine, constant")


# ---------------------------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------------------------

def adafactor(learning_rate: Schedule, *, decay_rate: float = 0.8, step_offset: int = 0,
              clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
              factored: bool = True, min_dim_size_to_factor: int = 128, momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None, epsilon: float = 1e-30) -> optax.GradientTransformation:
    """Adafactor with T5X's defaults (t5x/adafactor.py).

    Second moments decay as 1 - (step - step_offset + 1)^-decay_rate (T5X's
    `adafactor_decay_rate_pow` with exponent 0.8) and are factored into row/column means for
    matrices whose two largest dims are >= min_dim_size_to_factor; no first moment (momentum);
    the update is RMS-clipped to clipping_threshold and scaled by max(rms(param), 1e-3)
    (multiply_by_parameter_scale, T5X's epsilon2). Fine-tuning from step N: step_offset=N.
    """
    return optax.adafactor(learning_rate, min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
                           decay_offset=step_offset, multiply_by_parameter_scale=multiply_by_parameter_scale,
                           clipping_threshold=clipping_threshold, momentum=momentum,
                           weight_decay_rate=weight_decay_rate, eps=epsilon, factored=factored)


def adamw(learning_rate: Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, decay_vectors: bool = False) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay). By default only matrices decay, not norm scales / vectors."""
    mask = None if decay_vectors else (lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


OPTIMIZERS = {"adafactor": adafactor, "adamw": adamw}


def make_optimizer(name: str = "adafactor", schedule: str = "rsqrt", learning_rate: float = 1.0,
                   warmup_steps: int = 10_000, total_steps: Optional[int] = None, end_learning_rate: float = 0.0,
                   clip_grad_norm: Optional[float] = None, **optimizer_kwargs) -> Optimizer:
    """The optimizer `name` ('adafactor' or 'adamw') on the schedule `schedule`.

    `optimizer_kwargs` go to `adafactor(...)` / `adamw(...)` (e.g. decay_rate, weight_decay).
    `clip_grad_norm` clips the global gradient norm before the optimizer sees it.
    The defaults are T5 pre-training: Adafactor, lr = 1 / sqrt(max(step, 10k)).
    """
    if not isinstance(name, str) or name not in OPTIMIZERS:  # a list or dict from gin is no name either
        raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    build = OPTIMIZERS[name]
    valid = [p for p in inspect.signature(build).parameters if p != "learning_rate"]
    unknown = sorted(set(optimizer_kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown {name} option(s) {unknown}; valid: {', '.join(valid)}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise UserError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm}")

    learning_rate_fn = make_schedule(schedule, learning_rate, warmup_steps, total_steps, end_learning_rate)
    tx = build(learning_rate_fn, **optimizer_kwargs)
    if clip_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return Optimizer(tx.init, tx.update, learning_rate_fn)
