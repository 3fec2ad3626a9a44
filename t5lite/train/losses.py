"""Training losses, chosen from gin by name: `train.loss = 'cross_entropy'` (the default) or
`'distillation'`, with `train.loss_kwargs = {...}`; users register their own with
`@t5lite.registry.register('loss', name)`.

A loss is a frozen dataclass (its fields are the settings) called on one (micro)batch:

    loss(logits [B, T, V], batch, teacher_logits [B, T, V] or None) -> sums

`sums` are float32 scalars *summed* over weighted target tokens: 'loss' (what is differentiated),
'z_loss', 'weight_sum' and 'correct', plus any extra terms (e.g. 'distill/kl'). The train step adds
them over microbatches and divides them by the weight sum (or a fixed loss_normalizing_factor) at
the very end, so every loss microbatches and normalises exactly like cross-entropy. A loss whose
`needs_teacher` is True gets the logits of a frozen teacher model (t5lite/train/teacher.py).

A loss with a positive `logit_chunk` field (train.loss_kwargs={'logit_chunk': 2048}) is computed by
`chunked_sums` from the decoder's final hidden states, `logit_chunk` tokens at a time: the [B, T, V]
float32 logits and their gradient never exist whole (long inputs, large vocabularies).
"""

import dataclasses
from typing import Callable, ClassVar, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from t5lite import registry
from t5lite.errors import UserError
from t5lite.model.layers import first_argmax
from t5lite.registry import register

Batch = Dict[str, jax.Array]
Sums = Dict[str, jax.Array]
SUMS = ("loss", "z_loss", "weight_sum", "correct")  # what every loss returns (extra keys are reported too)


# ---------------------------------------------------------------------------------------------
# Cross-entropy (T5X's cross_entropy_with_logits, z-loss and label smoothing).
# ---------------------------------------------------------------------------------------------

def _cross_entropy_tokens(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                          label_smoothing: float = 0.0) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token T5X `cross_entropy_with_logits` -> (loss incl. z-loss, z-loss, correct), each [B, T].

    Per token, with soft targets q (1 - ls on the target, ls / (V - 1) elsewhere):
      loss = -sum_v q_v log_softmax(logits)_v + z_loss * logZ^2 - H(q)
    where H(q) (T5X's `normalizing_constant`) makes a perfect prediction score 0. Written
    without a [B, T, V] one-hot: sum_v q_v l_v = (on - off) l_target + off sum_v l_v.
    """
    if logits.ndim != targets.ndim + 1:
        raise UserError(f"logits {logits.shape} must have one more axis than targets {targets.shape}")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)  # [B, T, V]
    on = 1.0 - label_smoothing
    off = label_smoothing / (vocab - 1)
    entropy = -(on * jnp.log(on) + (vocab - 1) * off * jnp.log(off + 1e-20))  # H(q), 0 when ls == 0

    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    soft_logit = (on - off) * target_logit + off * jnp.sum(logits, axis=-1)  # [B, T] = sum_v q_v l_v
    token_z_loss = z_loss * jnp.square(log_z)  # [B, T]
    token_loss = log_z - soft_logit + token_z_loss - entropy  # [B, T]
    correct = first_argmax(logits) == targets  # [B, T]
    return token_loss, token_z_loss, correct


def _weighted_sums(token_loss, token_z_loss, correct, weights: Optional[jax.Array]) -> Sums:
    weights = jnp.ones_like(token_loss) if weights is None else weights.astype(jnp.float32)
    return dict(loss=jnp.sum(token_loss * weights), z_loss=jnp.sum(token_z_loss * weights),
                weight_sum=jnp.sum(weights), correct=jnp.sum(correct * weights))


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array], *,
                       z_loss: float = 0.0, label_smoothing: float = 0.0) -> Sums:
    """Weighted sums over tokens of T5X's cross-entropy -> {loss (incl. z-loss), z_loss, weight_sum, correct}."""
    return _weighted_sums(*_cross_entropy_tokens(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing),
                          weights)


def normaliser(weight_sum: jax.Array, loss_normalizing_factor: Optional[float]) -> jax.Array:
    """What loss sums are divided by: the weighted-token count, or a fixed constant (T5X style)."""
    if loss_normalizing_factor is not None:
        return jnp.asarray(loss_normalizing_factor, jnp.float32)
    return jnp.maximum(weight_sum, 1e-8)  # an all-padding batch has zero sums: loss 0, not NaN


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None, *,
                       z_loss: float = 0.0, label_smoothing: float = 0.0,
                       loss_normalizing_factor: Optional[float] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, T, V] float, targets [B, T] int, weights [B, T] or None -> (loss, z_loss, weight_sum).

    `loss` (which includes the z-loss term) and `z_loss` are summed over weighted tokens and
    divided by the weight sum (a per-token mean) or by `loss_normalizing_factor` when given.
    """
    sums = cross_entropy_sums(logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing)
    norm = normaliser(sums["weight_sum"], loss_normalizing_factor)
    return sums["loss"] / norm, sums["z_loss"] / norm, sums["weight_sum"]


def loss_weights(batch: Batch) -> jax.Array:
    """`decoder_loss_weights` when the batch has them, else 1 on every non-padding target."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"]
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Token-level distillation (Hinton et al. 2015).
# ---------------------------------------------------------------------------------------------

def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """KL(softmax(teacher / T) || softmax(student / T)) per token, [B, T] float32 (>= 0)."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)  # [B, T, V]
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)  # [B, T, V]
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


# ---------------------------------------------------------------------------------------------
# Chunked over tokens: logits made and differentiated a chunk at a time.
# ---------------------------------------------------------------------------------------------

def chunked_sums(loss_fn: Callable, hidden: jax.Array, batch: Batch, head: Callable,
                 teacher_logits: Optional[jax.Array] = None) -> Sums:
    """`loss_fn`'s sums from hidden states [B, T, D] and the output layer `head` ([..., D] -> [..., V]),
    `loss_fn.logit_chunk` tokens at a time: a scan over token chunks whose body is under jax.checkpoint,
    so the backward pass recomputes each chunk's [chunk, V] logits instead of keeping [B, T, V] alive.
    Every loss here is a sum over tokens, so chunk sums add up to the unchunked sums."""
    chunk = loss_fn.logit_chunk
    n = hidden.shape[0] * hidden.shape[1]
    count = -(-n // chunk)

    def pieces(x):  # [B, T, ...] -> [count, 1, chunk, ...], zero-padded (padding has weight 0)
        x = x.reshape((n,) + x.shape[2:])
        x = jnp.pad(x, [(0, count * chunk - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((count, 1, chunk) + x.shape[1:])

    xs = dict(hidden=pieces(hidden), decoder_target_tokens=pieces(batch["decoder_target_tokens"]),
              decoder_loss_weights=pieces(loss_weights(batch).astype(jnp.float32)))
    if teacher_logits is not None:  # the teacher's logits are an input (no gradient): chunked, not recomputed
        xs["teacher"] = pieces(teacher_logits)

    @jax.checkpoint
    def one(piece):
        logits = head(piece["hidden"])  # [1, chunk, V] float32
        return loss_fn(logits, {k: piece[k] for k in ("decoder_target_tokens", "decoder_loss_weights")},
                       piece.get("teacher"))

    def body(total, piece):
        return jax.tree.map(jnp.add, total, one(piece)), None

    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], xs))
    total, _ = jax.lax.scan(body, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), xs)
    return total


def _check_chunk(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"train.loss_kwargs['logit_chunk'] must be a whole number of tokens >= 0 (0: unchunked), "
                        f"got {value!r}")


def make(name: str, settings: Optional[dict] = None, *, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """The loss registered as `name`, built with `settings` (train.loss_kwargs) and, when it has those
    fields, train.z_loss / train.label_smoothing. Unknown names and settings are one-line UserErrors."""
    cls = registry.get("loss", name)
    if settings is not None and not isinstance(settings, dict):
        raise UserError(f"train.loss_kwargs must be a dict like {{'alpha': 0.5}}, got {settings!r}")
    settings = dict(settings or {})
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    ce_settings = {"z_loss": z_loss, "label_smoothing": label_smoothing}
    bad = sorted(k for k in settings if k not in fields or k in ce_settings)
    if bad:
        raise UserError(f"train.loss_kwargs: {name!r} has no setting {', '.join(map(repr, bad))}; its settings: "
                        f"{', '.join(sorted(fields - set(ce_settings))) or 'none'} (z-loss and label smoothing are "
                        "train.z_loss / train.label_smoothing)")
    return cls(**{k: v for k, v in ce_settings.items() if k in fields}, **settings)


def _check(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high
          and not (low_open and value == low))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]".replace("inf]", "inf)")
        raise UserError(f"train.loss_kwargs['{name}'] must be a number in {interval}, got {value!r}")


@register("loss", "cross_entropy")
@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """T5X's cross-entropy against the targets, with z-loss and label smoothing."""

    z_loss: float = 0.0
    label_smoothing: float = 0.0
    logit_chunk: int = 0  # > 0: logits made `logit_chunk` tokens at a time (chunked_sums)
    needs_teacher: ClassVar[bool] = False

    def __post_init__(self):
        _check_chunk(self.logit_chunk)

    def __call__(self, logits: jax.Array, batch: Batch, teacher_logits: Optional[jax.Array] = None) -> Sums:
        return cross_entropy_sums(logits, batch["decoder_target_tokens"], loss_weights(batch), z_loss=self.z_loss,
                                  label_smoothing=self.label_smoothing)


@register("loss", "distillation")
@dataclasses.dataclass(frozen=True)
class Distillation:
    """Token-level knowledge distillation (Hinton et al. 2015), per weighted target token:

        (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + z-loss

    The T^2 factor keeps the KL's gradient, alpha * T * (softmax(student/T) - softmax(teacher/T)),
    on the scale of the CE's as T changes (Hinton's convention). The z-loss (train.z_loss) counts
    in full whatever alpha: the KL cannot see a shift of all logits, so log Z needs it. Reports
    'distill/ce' (CE with label smoothing, no z-loss) and 'distill/kl' (the KL at T, unscaled).
    """

    alpha: float = 0.5
    temperature: float = 1.0
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    logit_chunk: int = 0  # > 0: the student's logits a chunk at a time (the teacher's stay whole: no gradient)
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self):
        _check_chunk(self.logit_chunk)
        _check("alpha", self.alpha, 0.0, 1.0)
        _check("temperature", self.temperature, 0.0, float("inf"), low_open=True)

    def __call__(self, logits: jax.Array, batch: Batch, teacher_logits: Optional[jax.Array] = None) -> Sums:
        if teacher_logits is None or teacher_logits.shape != logits.shape:
            raise UserError(f"the distillation loss needs teacher logits shaped like the student's {logits.shape}, "
                            f"got {None if teacher_logits is None else teacher_logits.shape}; set "
                            "train.teacher_checkpoint to a model with the student's vocab_size")
        token_loss, token_z, correct = _cross_entropy_tokens(logits, batch["decoder_target_tokens"],
                                                             z_loss=self.z_loss, label_smoothing=self.label_smoothing)
        token_ce = token_loss - token_z  # [B, T]
        token_kl = kl_divergence(teacher_logits, logits, self.temperature)  # [B, T]
        token_total = ((1.0 - self.alpha) * token_ce + self.alpha * self.temperature ** 2 * token_kl
                       + token_z)  # [B, T]
        sums = _weighted_sums(token_total, token_z, correct, loss_weights(batch))
        weights = loss_weights(batch).astype(jnp.float32)
        return {**sums, "distill/ce": jnp.sum(token_ce * weights), "distill/kl": jnp.sum(token_kl * weights)}
