"""Cross-entropy (z-loss, label smoothing) and distillation computed a chunk of tokens at a time equal the
unchunked losses, sums and gradients; a train step with train.loss_kwargs={'logit_chunk': N} equals today's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite.errors import UserError
from t5lite.model import EncoderDecoder, get_config, init_params
from t5lite.train import losses
from t5lite.train import step as step_lib
from t5lite.train.state import TrainState

B, T, D, V = 3, 7, 5, 11  # 21 tokens: chunks of 4 leave a padded last chunk


def _inputs(seed=0):
    r = np.random.RandomState(seed)
    hidden = jnp.asarray(r.randn(B, T, D), jnp.float32)
    kernel = jnp.asarray(r.randn(D, V), jnp.float32)
    targets = jnp.asarray(r.randint(1, V, (B, T)), jnp.int32).at[2, 5:].set(0)  # padding
    teacher = jnp.asarray(r.randn(B, T, V), jnp.float32)
    return hidden, kernel, {"decoder_target_tokens": targets}, teacher


@pytest.mark.parametrize("loss_fn", [
    losses.CrossEntropy(),
    losses.CrossEntropy(z_loss=1e-2, label_smoothing=0.1),
    losses.Distillation(alpha=0.3, temperature=2.0, z_loss=1e-3, label_smoothing=0.05),
], ids=["ce", "ce_zloss_smoothing", "distillation"])
def test_chunked_sums_and_gradients_equal_unchunked(loss_fn):
    hidden, kernel, batch, teacher = _inputs()
    teacher = teacher if loss_fn.needs_teacher else None

    def total(h, w, chunk):
        head = lambda x: x @ w  # noqa: E731  # [..., D] -> [..., V]
        if chunk:
            sums = losses.chunked_sums(type(loss_fn)(**{**loss_fn.__dict__, "logit_chunk": chunk}), h, batch, head,
                                       teacher)
        else:
            sums = loss_fn(head(h), batch, teacher)
        return sums["loss"], sums

    (ref, ref_sums), ref_grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(hidden, kernel, 0)
    (got, got_sums), got_grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True),
                                         static_argnums=2)(hidden, kernel, 4)
    assert set(got_sums) == set(ref_sums)
    for key in ref_sums:
        np.testing.assert_allclose(got_sums[key], ref_sums[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(ref_grads, got_grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_logit_chunk_is_validated():
    with pytest.raises(UserError, match="logit_chunk"):
        losses.make("cross_entropy", {"logit_chunk": -1})
    assert losses.make("cross_entropy", {"logit_chunk": 64}).logit_chunk == 64


def test_train_step_with_chunked_logits_equals_unchunked():
    cfg = get_config("tiny", logits_via_embedding=True)  # tied output layer: the head shares the embedding
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    targets = rng.integers(2, 500, (2, 9)).astype(np.int32)
    targets[1, 6:] = 0
    batch = dict(encoder_input_tokens=jnp.asarray(rng.integers(2, 500, (2, 13)), jnp.int32),
                 decoder_target_tokens=jnp.asarray(targets),
                 decoder_input_tokens=jnp.asarray(np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1)))
    optimizer = optax.sgd(1.0)
    model = EncoderDecoder(cfg)
    results = {}
    for chunk in (0, 5):
        state = TrainState.create(params, optimizer)
        loss = losses.make("cross_entropy", {"logit_chunk": chunk} if chunk else None, z_loss=1e-3,
                           label_smoothing=0.1)
        results[chunk] = jax.jit(lambda s, b, loss=loss: step_lib.train_step(
            s, b, model=model, optimizer=optimizer, loss=loss))(state, batch)
    (dense_state, dense_metrics), (chunk_state, chunk_metrics) = results[0], results[5]
    for key in ("loss", "z_loss", "accuracy", "weight_sum", "grad_norm"):
        np.testing.assert_allclose(chunk_metrics[key], dense_metrics[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(dense_state.params), jax.tree.leaves(chunk_state.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
