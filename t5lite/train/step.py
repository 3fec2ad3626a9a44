"""Train step and eval step: pure functions of (state, batch), composed like T5X's.

    train_step = compute grads (per microbatch, summed with lax.scan) -> normalise -> apply grads

The loss is chosen by name from t5lite/train/losses.py (cross-entropy, distillation, your own);
a loss that learns from a teacher gets the teacher's logits, whose params are an input of the
jitted step. Losses are *sums* over weighted target tokens until the very end, where they are divided by
the number of weighted tokens in the whole batch (or a constant `loss_normalizing_factor`), so
4 microbatches of 2 rows give exactly the update of one batch of 8. Dropout keys come from
fold_in(key(seed), step), so a resumed run repeats the same step bit for bit. `make_train_step`
jits the step with the state / batch shardings of t5lite/train/partitioning.py; under jit the
sums run over the global (sharded) batch, so every metric is global.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5lite.errors import UserError
from t5lite.train import losses
from t5lite.train.losses import cross_entropy_loss, loss_weights  # noqa: F401 - re-exported: step.cross_entropy_loss
from t5lite.train.partitioning import batch_sharding
from t5lite.train.state import TrainState

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


def _model_features(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "decoder_loss_weights"}


AUX_LOSS = "aux_loss"  # the collection modules sow auxiliary losses into (e.g. MoE load balancing)


def aux_losses(sown) -> Dict[str, jax.Array]:
    """Sums what modules sowed into the 'aux_loss' collection -> {'aux_loss': total, 'aux_loss/<name>': ...}.

    Every sown value counts, whatever module sowed it (a scanned stack sows one per layer).
    Empty (a model that sows nothing) -> {}.
    """
    by_name: Dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
        name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        by_name[f"{AUX_LOSS}/{name}"] = by_name.get(f"{AUX_LOSS}/{name}", 0.0) + jnp.sum(value)
    return {AUX_LOSS: sum(by_name.values()), **by_name} if by_name else {}


def _apply_with_aux(model: nn.Module, params, batch: Batch, **kwargs):
    """model.apply that also collects the sown auxiliary losses -> (logits, aux_losses dict)."""
    logits, sown = model.apply({"params": params}, **_model_features(batch), mutable=[AUX_LOSS], **kwargs)
    return logits, aux_losses(sown.get(AUX_LOSS, {}))


# ---------------------------------------------------------------------------------------------
# Train step: compute grads -> accumulate over microbatches -> apply grads.
# ---------------------------------------------------------------------------------------------

def compute_grads(params, batch: Batch, dropout_rng: jax.Array, *, model: nn.Module,
                  loss_fn: Callable = losses.CrossEntropy(), teacher: Optional[Tuple[nn.Module, Any]] = None):
    """Gradient of the *summed* weighted loss of one (micro)batch -> (grads, sums dict).

    `loss_fn` gives the main term. Auxiliary losses the modules report count as a loss on every
    weighted token (added x weight_sum), so after the final normalisation they add their value to
    the mean loss. `teacher` = (module, params): its logits, without dropout and under
    stop_gradient, are computed outside the differentiated function and handed to `loss_fn`.
    """
    teacher_logits = None
    if teacher is not None:
        teacher_model, teacher_params = teacher
        teacher_logits = jax.lax.stop_gradient(teacher_model.apply(
            {"params": teacher_params}, **_model_features(batch), enable_dropout=False))  # [B, T, V]

    def objective(p):
        if getattr(loss_fn, "logit_chunk", 0):  # the output layer runs inside the loss, a chunk of tokens at a time
            hidden, aux = _apply_with_aux(model, p, batch, enable_dropout=True, rngs={"dropout": dropout_rng},
                                          return_hidden=True)  # [B, T, D]
            head = lambda h: model.apply({"params": p}, h, method="logits_from_hidden")  # noqa: E731
            sums = losses.chunked_sums(loss_fn, hidden, batch, head, teacher_logits)
        else:
            logits, aux = _apply_with_aux(model, p, batch, enable_dropout=True,
                                          rngs={"dropout": dropout_rng})  # [B, T, V] float32
            sums = loss_fn(logits, batch, teacher_logits)
        if aux:
            aux = {k: v * sums["weight_sum"] for k, v in aux.items()}
            sums = {**sums, "loss": sums["loss"] + aux[AUX_LOSS], **aux}
        return sums["loss"], sums

    return jax.grad(objective, has_aux=True)(params)


def _constrain(grads, grad_shardings):
    """Pins a gradient tree to the params' shardings (None: one device, nothing to pin)."""
    return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)


def accumulate_grads(params, batch: Batch, dropout_rng: jax.Array, *, num_microbatches: int,
                     grad_shardings=None, **grad_kwargs):
    """Sums `compute_grads` over `num_microbatches` (> 1) slices of the batch with `lax.scan`.

    Microbatch i holds rows i, i + M, i + 2M, ... : reshaping [B] -> [B/M, M] keeps every
    device's rows on that device when the batch axis is sharded. Microbatch i uses dropout key
    fold_in(dropout_rng, i). `grad_shardings` (the params' shardings) pins the accumulator's layout.
    """
    constrain = functools.partial(_constrain, grad_shardings=grad_shardings)
    batch_size = batch["decoder_target_tokens"].shape[0]
    if batch_size % num_microbatches:
        raise UserError(f"batch size {batch_size} is not divisible by num_microbatches={num_microbatches}; "
                        "choose a num_microbatches that divides the batch size")

    def split(x):  # [B, ...] -> [M, B/M, ...]
        x = x.reshape((batch_size // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    microbatches = jax.tree.map(split, batch)

    def body(carry, xs):
        index, microbatch = xs
        grads, sums = compute_grads(params, microbatch, jax.random.fold_in(dropout_rng, index), **grad_kwargs)
        carry_grads, carry_sums = carry
        return (constrain(jax.tree.map(jnp.add, carry_grads, grads)), jax.tree.map(jnp.add, carry_sums, sums)), None

    sums_shape = jax.eval_shape(lambda: compute_grads(params, jax.tree.map(lambda x: x[0], microbatches),
                                                      dropout_rng, **grad_kwargs)[1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)  # incl. any aux losses
    init = (constrain(jax.tree.map(jnp.zeros_like, params)), zero_sums)
    (grads, sums), _ = jax.lax.scan(body, init, (jnp.arange(num_microbatches), microbatches))
    return grads, sums


def apply_grads(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update with already-normalised grads; step + 1."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def train_step(state: TrainState, batch: Batch, teacher_params=None, *, model: nn.Module,
               optimizer: optax.GradientTransformation, loss=None, teacher_module: Optional[nn.Module] = None,
               dropout_seed: int = 0, num_microbatches: int = 1, loss_normalizing_factor: Optional[float] = None,
               grad_shardings=None) -> Tuple[TrainState, Metrics]:
    """One update on `batch` -> (new_state, metrics).

    `loss` is a loss object of t5lite/train/losses.py, built once by the run (TrainConfig.make_loss;
    default: plain cross-entropy); `teacher_module` and `teacher_params` for a loss that needs a teacher
    (its params are an input of the jitted step, not constants baked into the program).
    metrics: loss (incl. z-loss and auxiliary losses) and z_loss per weighted token (or /
    loss_normalizing_factor), accuracy (argmax == target over weighted tokens), weight_sum,
    grad_norm (global, before any clipping), learning_rate (of this update; NaN for an optimizer
    without a schedule), the loss's extra sums (e.g. distill/kl) and, when modules report any,
    aux_loss and aux_loss/<name>, all normalised like the loss.
    """
    loss_fn = losses.CrossEntropy() if loss is None else loss
    teacher = None if teacher_module is None else (teacher_module, teacher_params)
    if loss_fn.needs_teacher != (teacher is not None):
        raise UserError(f"the loss {type(loss_fn).__name__} {'needs' if loss_fn.needs_teacher else 'takes no'} "
                        "teacher; set train.teacher_checkpoint together with a loss that uses it (e.g. 'distillation')")
    dropout_rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    grad_kwargs = dict(model=model, loss_fn=loss_fn, teacher=teacher)
    if num_microbatches > 1:
        grads, sums = accumulate_grads(state.params, batch, dropout_rng, num_microbatches=num_microbatches,
                                       grad_shardings=grad_shardings, **grad_kwargs)
    else:
        grads, sums = compute_grads(state.params, batch, dropout_rng, **grad_kwargs)
        grads = _constrain(grads, grad_shardings)
    norm = losses.normaliser(sums["weight_sum"], loss_normalizing_factor)
    grads = jax.tree.map(lambda g: g / norm, grads)
    new_state = apply_grads(state, grads, optimizer)

    lr_fn = getattr(optimizer, "learning_rate_fn", None)
    metrics = dict(
        loss=sums["loss"] / norm,
        z_loss=sums["z_loss"] / norm,
        accuracy=sums["correct"] / jnp.maximum(sums["weight_sum"], 1e-8),
        weight_sum=sums["weight_sum"],
        grad_norm=optax.tree.norm(grads),
        learning_rate=jnp.asarray(lr_fn(state.step) if lr_fn else jnp.nan, jnp.float32),
        **{k: v / norm for k, v in sums.items() if k not in losses.SUMS},
    )
    return new_state, metrics


def eval_step(params, batch: Batch, *, model: nn.Module) -> Metrics:
    """Sums over one batch, to be added over many: loss_sum (plain CE, whatever the training loss, so
    runs compare), correct, weight_sum, and aux_loss_sum (auxiliary losses x weight_sum) when
    modules report any.

    Mean loss = loss_sum / weight_sum, perplexity = exp(that), accuracy = correct / weight_sum.
    """
    logits, aux = _apply_with_aux(model, params, batch, enable_dropout=False)  # [B, T, V]
    sums = losses.cross_entropy_sums(logits, batch["decoder_target_tokens"], losses.loss_weights(batch))
    extra = {"aux_loss_sum": aux[AUX_LOSS] * sums["weight_sum"]} if aux else {}
    return dict(loss_sum=sums["loss"], correct=sums["correct"], weight_sum=sums["weight_sum"], **extra)


# ---------------------------------------------------------------------------------------------
# Jitted, partitioned steps.
# ---------------------------------------------------------------------------------------------

def _under_mesh(jitted: Callable, mesh, rules, bound: tuple = ()) -> Callable:
    """Calls `jitted(*args, *bound)` inside the mesh + logical-rules context, so the model's activation
    constraints (nn.with_logical_constraint) take effect when it is traced. `bound`: trailing
    arguments every call passes (a teacher's params: jit inputs, not constants baked into the program)."""

    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args, *bound)

    def lower(*args):  # for compiled-cost analysis (FLOPs, memory) in bench / MFU
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args, *bound)

    def trace(*args):  # the jaxpr and, via .lower(), the program (`t5lite compile`)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.trace(*args, *bound)

    call.lower, call.trace = lower, trace
    return call


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules,
                    state_shardings: TrainState, *, donate: bool = True, teacher=None, **step_kwargs) -> Callable:
    """jit(train_step) with sharded inputs/outputs: (state, batch) -> (state, metrics).

    `state_shardings` comes from partitioning.state_shardings (or `jax.tree.map(lambda x:
    x.sharding, state)`); the batch is split over the logical 'batch' axis; metrics are
    replicated. The input state is donated (its buffers are reused), so do not use it after.
    `teacher` (t5lite/train/teacher.py: module, params, shardings): its params are a third, sharded,
    never-donated input of the jitted step, passed by every call.
    step_kwargs: loss (an object), dropout_seed, num_microbatches, loss_normalizing_factor.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    teacher_args = () if teacher is None else (teacher.params,)
    step = functools.partial(train_step, model=model, optimizer=optimizer, grad_shardings=state_shardings.params,
                             teacher_module=None if teacher is None else teacher.module, **step_kwargs)
    in_shardings = (state_shardings, batch_sharding(mesh, rules)) + (() if teacher is None else (teacher.shardings,))
    jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, replicated),
                     donate_argnums=(0,) if donate else ())
    return _under_mesh(jitted, mesh, rules, bound=teacher_args)


def make_eval_step(model: nn.Module, mesh: jax.sharding.Mesh, rules, param_shardings) -> Callable:
    """jit(eval_step): (params, batch) -> replicated sums {loss_sum, correct, weight_sum}."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(lambda params, batch: eval_step(params, batch, model=model),
                     in_shardings=(param_shardings, batch_sharding(mesh, rules)), out_shardings=replicated)
    return _under_mesh(jitted, mesh, rules)
