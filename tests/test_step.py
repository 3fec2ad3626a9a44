"""Loss, train step, optimizers and schedules against NumPy / closed-form references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite.errors import UserError
from t5lite.model import EncoderDecoder, get_config, init_params
from t5lite.train import losses as losses_lib
from t5lite.train import optimizers, step
from t5lite.train.state import TrainState


# ---------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------

def numpy_cross_entropy(logits, targets, weights, z_loss, label_smoothing, loss_normalizing_factor):
    """T5X's compute_weighted_cross_entropy, written out in float64 with an explicit one-hot."""
    logits = logits.astype(np.float64)
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    soft = np.where(np.arange(vocab) == targets[..., None], on, off)  # [B, T, V]
    constant = -(on * np.log(on) + (vocab - 1) * off * np.log(off + 1e-20))
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)  # [B, T]
    log_softmax = logits - log_z[..., None]
    token_z = z_loss * log_z ** 2
    token_loss = -np.sum(soft * log_softmax, -1) + token_z - constant
    norm = loss_normalizing_factor if loss_normalizing_factor is not None else weights.sum()
    return (token_loss * weights).sum() / norm, (token_z * weights).sum() / norm, weights.sum()


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("loss_normalizing_factor", [None, 7.0])
def test_cross_entropy_matches_numpy(z_loss, label_smoothing, loss_normalizing_factor):
    rng = np.random.RandomState(0)
    logits = (3 * rng.randn(3, 5, 11)).astype(np.float32)  # [B, T, V]
    targets = rng.randint(0, 11, (3, 5)).astype(np.int32)
    weights = (rng.rand(3, 5) * (rng.rand(3, 5) > 0.3)).astype(np.float32)  # fractional, some zero
    got = step.cross_entropy_loss(logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing,
                                  loss_normalizing_factor=loss_normalizing_factor)
    want = numpy_cross_entropy(logits, targets, weights, z_loss, label_smoothing, loss_normalizing_factor)
    np.testing.assert_allclose(np.array(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradient_is_closed_form():
    """d loss / d logits = w / N * ((1 + 2 z logZ) softmax - q): T5X's custom-vjp gradient."""
    rng = np.random.RandomState(1)
    logits = rng.randn(2, 4, 7).astype(np.float32)
    targets = rng.randint(0, 7, (2, 4)).astype(np.int32)
    weights = (rng.rand(2, 4) > 0.25).astype(np.float32)
    z, ls = 0.1, 0.2
    grad = jax.grad(lambda x: step.cross_entropy_loss(x, targets, weights, z_loss=z, label_smoothing=ls)[0])(logits)
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    soft = np.where(np.arange(7) == targets[..., None], 1 - ls, ls / 6)
    want = (weights / weights.sum())[..., None] * ((1 + 2 * z * log_z)[..., None] * np.exp(x - log_z[..., None]) - soft)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_perfect_prediction_with_label_smoothing_scores_zero():
    """The normalising constant H(q) makes predicting exactly the smoothed targets cost 0."""
    vocab, ls = 9, 0.1
    targets = np.array([[3, 5]], np.int32)
    q = np.where(np.arange(vocab) == targets[..., None], 1 - ls, ls / (vocab - 1))
    loss, _, _ = step.cross_entropy_loss(np.log(q).astype(np.float32), targets, label_smoothing=ls)
    assert abs(float(loss)) < 1e-5


def test_bad_label_smoothing_is_a_user_error():
    with pytest.raises(UserError, match="label_smoothing"):
        step.cross_entropy_loss(np.zeros((1, 2, 5), np.float32), np.zeros((1, 2), np.int32), label_smoothing=1.0)


# ---------------------------------------------------------------------------------------------
# Train step on the tiny model.
# ---------------------------------------------------------------------------------------------

def make_batch(config, batch_size=8, inputs_len=10, targets_len=7, seed=0):
    rng = np.random.RandomState(seed)
    targets = rng.randint(2, config.vocab_size, (batch_size, targets_len)).astype(np.int32)
    lengths = rng.randint(2, targets_len + 1, batch_size)  # ragged: padding differs per row
    targets[np.arange(targets_len)[None, :] >= lengths[:, None]] = 0
    inputs = rng.randint(2, config.vocab_size, (batch_size, inputs_len)).astype(np.int32)
    return dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
                decoder_input_tokens=np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1),
                decoder_loss_weights=(targets > 0).astype(np.int32))


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    return config, EncoderDecoder(config), jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))


def _jit_step(model, optimizer, **kwargs):
    return jax.jit(functools.partial(step.train_step, model=model, optimizer=optimizer, **kwargs))


def test_microbatches_give_the_same_update(tiny):
    """4 microbatches of 2 rows = one batch of 8: losses are normalised over the whole batch."""
    config, model, params = tiny
    batch = make_batch(config)
    optimizer = optax.sgd(1.0)  # new params = params - grads, so params compare the gradients
    state = TrainState.create(params, optimizer)
    kwargs = dict(loss=losses_lib.make("cross_entropy", z_loss=1e-3, label_smoothing=0.1))
    one, m1 = _jit_step(model, optimizer, num_microbatches=1, **kwargs)(state, batch)
    four, m4 = _jit_step(model, optimizer, num_microbatches=4, **kwargs)(state, batch)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(a).max()))
    for name in ("loss", "z_loss", "accuracy", "weight_sum", "grad_norm"):
        np.testing.assert_allclose(m1[name], m4[name], rtol=1e-6, err_msg=name)
    assert float(m1["weight_sum"]) == batch["decoder_loss_weights"].sum()
    assert int(one.step) == 1 and int(four.step) == 1
    with pytest.raises(UserError, match="num_microbatches"):
        step.train_step(state, batch, model=model, optimizer=optimizer, num_microbatches=3)


def test_adafactor_lowers_the_loss_and_steps_are_deterministic(tiny):
    config = get_config("tiny", dropout_rate=0.1)
    model, params = EncoderDecoder(config), tiny[2]
    batch = make_batch(config, seed=1)
    optimizer = optimizers.make_optimizer()  # T5 pre-training defaults: Adafactor, rsqrt -> lr 0.01
    # The seed is traced here (one compile for all seeds); make_train_step bakes it in.
    train = jax.jit(lambda state, batch, seed: step.train_step(state, batch, model=model, optimizer=optimizer,
                                                               dropout_seed=seed))
    state = start = TrainState.create(params, optimizer)
    losses = []
    for _ in range(10):
        state, metrics = train(state, batch, 3)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_allclose(metrics["learning_rate"], 0.01, rtol=1e-6)
    assert np.isfinite(float(metrics["grad_norm"])) and 0 <= float(metrics["accuracy"]) <= 1
    # The dropout key depends only on (seed, step): replaying step 0 gives the same numbers ...
    _, replay = train(start, batch, 3)
    assert float(replay["loss"]) == losses[0]
    # ... while another seed draws other dropout masks.
    _, other_seed = train(start, batch, 4)
    assert float(other_seed["loss"]) != losses[0]


def test_eval_step_sums(tiny):
    config, model, params = tiny
    batch = make_batch(config, seed=2)
    sums, logits = jax.jit(lambda p, b: (step.eval_step(p, b, model=model), model.apply(
        {"params": p}, **{k: v for k, v in b.items() if k != "decoder_loss_weights"})))(params, batch)
    loss, _, weight_sum = step.cross_entropy_loss(logits, batch["decoder_target_tokens"],
                                                  batch["decoder_loss_weights"])
    np.testing.assert_allclose(sums["loss_sum"], loss * weight_sum, rtol=1e-5)
    assert float(sums["weight_sum"]) == batch["decoder_loss_weights"].sum()
    correct = (np.argmax(logits, -1) == batch["decoder_target_tokens"]) * batch["decoder_loss_weights"]
    assert float(sums["correct"]) == correct.sum()


# ---------------------------------------------------------------------------------------------
# Schedules and the optimizer factory.
# ---------------------------------------------------------------------------------------------

def test_rsqrt_schedule():
    lr = optimizers.make_schedule("rsqrt", learning_rate=1.0, warmup_steps=10_000)
    for s, want in [(0, 0.01), (5_000, 0.01), (10_000, 0.01), (40_000, 0.005), (1_000_000, 0.001)]:
        np.testing.assert_allclose(lr(s), want, rtol=1e-6)


def test_cosine_schedule():
    lr = optimizers.make_schedule("cosine", learning_rate=2.0, warmup_steps=100, total_steps=1100,
                                  end_learning_rate=0.2)
    expected = {0: 0.0, 50: 1.0, 100: 2.0, 600: 1.1, 1100: 0.2, 5000: 0.2,
                350: 0.2 + 1.8 * (1 + math.cos(math.pi / 4)) / 2}
    for s, want in expected.items():
        np.testing.assert_allclose(lr(s), want, rtol=1e-5, atol=1e-6, err_msg=str(s))
    with pytest.raises(UserError, match="total_steps"):
        optimizers.make_schedule("cosine", learning_rate=1.0, warmup_steps=10)


def test_constant_schedule():
    np.testing.assert_allclose(optimizers.make_schedule("constant", 1e-3, warmup_steps=0)(12345), 1e-3)
    warm = optimizers.make_schedule("constant", 1e-3, warmup_steps=10)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(99)], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_make_optimizer_options_and_errors():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    grads = {"w": jnp.full((4, 3), 10.0), "b": jnp.zeros((3,))}
    # clip_grad_norm: a huge gradient is cut to norm 1 before AdamW (whose first step is ~ -lr * sign).
    adam = optimizers.make_optimizer("adamw", "constant", 0.1, warmup_steps=0, clip_grad_norm=1.0, weight_decay=0.0)
    updates, _ = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-4)
    assert float(adam.learning_rate_fn(7)) == pytest.approx(0.1)
    with pytest.raises(UserError, match="unknown optimizer"):
        optimizers.make_optimizer("sgd")
    with pytest.raises(UserError, match="decay_rate"):
        optimizers.make_optimizer("adamw", decay_rate=0.8)  # an Adafactor option
    with pytest.raises(UserError, match="schedule"):
        optimizers.make_optimizer(schedule="linear")
