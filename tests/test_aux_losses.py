"""The train / eval steps add whatever auxiliary losses any module sows into 'aux_loss' (no MoE special case)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite.train import step


class _Reporter(nn.Module):
    """Sows `scale * mean(x^2)` as the auxiliary loss `name` and passes x on."""

    name_: str
    scale: float

    @nn.compact
    def __call__(self, x):
        self.sow("aux_loss", self.name_, self.scale * jnp.mean(jnp.square(x)))
        return x


class _ToyModel(nn.Module):
    """Embedding -> two reporting modules -> logits over 7 tokens; the step's model interface."""

    @nn.compact
    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, enable_dropout=False, **unused):
        x = nn.Embed(7, 4)(decoder_input_tokens)  # [B, T, 4]
        x = _Reporter("balance", 0.5, name="a")(x)
        x = _Reporter("balance", 0.25, name="b")(_Reporter("z", 2.0, name="c")(x))
        return nn.Dense(7)(x)


def _batch(rows=4):
    rng = np.random.default_rng(0)
    targets = rng.integers(1, 7, (rows, 5)).astype(np.int32)
    return dict(decoder_input_tokens=rng.integers(1, 7, (rows, 5)).astype(np.int32), decoder_target_tokens=targets)


def test_aux_losses_sums_every_sown_value_by_name():
    sown = {"encoder": {"layers": {"mlp": {"balance": (jnp.array([1.0, 2.0]),)}}},  # scanned: one per layer
            "decoder": {"layers_0": {"mlp": {"balance": (jnp.array(0.5),), "z": (jnp.array(0.25),)}}}}
    totals = step.aux_losses(sown)
    assert {k: float(v) for k, v in totals.items()} == {"aux_loss": 3.75, "aux_loss/balance": 3.5, "aux_loss/z": 0.25}
    assert step.aux_losses({}) == {}


def test_train_and_eval_steps_add_and_report_sown_losses():
    model, batch = _ToyModel(), _batch()
    params = model.init(jax.random.key(0), **batch)["params"]
    x = np.asarray(params["Embed_0"]["embedding"])[batch["decoder_input_tokens"]]
    balance, z = 0.75 * np.mean(np.square(x)), 2.0 * np.mean(np.square(x))
    logits = model.apply({"params": params}, **batch)
    ce = float(step.cross_entropy_loss(logits, batch["decoder_target_tokens"])[0])

    optimizer = optax.sgd(0.1)
    state = step.TrainState.create(params, optimizer)
    new_state, metrics = jax.jit(lambda s, b: step.train_step(s, b, model=model, optimizer=optimizer))(state, batch)
    assert float(metrics["aux_loss/balance"]) == pytest.approx(balance, rel=1e-5)
    assert float(metrics["aux_loss/z"]) == pytest.approx(z, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(ce + balance + z, rel=1e-5)
    # The gradient includes the auxiliary terms: compare with differentiating CE + aux directly.
    def total(p):
        out, sown = model.apply({"params": p}, **batch, mutable=["aux_loss"])
        return step.cross_entropy_loss(out, batch["decoder_target_tokens"])[0] + step.aux_losses(sown["aux_loss"])[
            "aux_loss"]
    want = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(total)(params))
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    two = jax.jit(lambda s, b: step.train_step(s, b, model=model, optimizer=optimizer, num_microbatches=2))
    _, metrics_two = two(step.TrainState.create(params, optimizer), batch)
    for key in ("loss", "aux_loss", "aux_loss/z"):  # equal weights per microbatch: the same numbers
        assert float(metrics_two[key]) == pytest.approx(float(metrics[key]), rel=1e-5)

    sums = step.eval_step(params, batch, model=model)
    assert float(sums["loss_sum"] / sums["weight_sum"]) == pytest.approx(ce, rel=1e-5)
    assert float(sums["aux_loss_sum"] / sums["weight_sum"]) == pytest.approx(balance + z, rel=1e-5)


def test_evaluation_reports_the_mean_aux_loss():
    from t5lite.train import partitioning
    from t5lite.train.run import evaluate_loss
    mesh = partitioning.make_mesh()
    fake_step = lambda params, batch: dict(loss_sum=jnp.float32(6.0), correct=jnp.float32(1.0),  # noqa: E731
                                           weight_sum=jnp.float32(3.0), aux_loss_sum=jnp.float32(0.3))
    batches = [dict(decoder_target_tokens=np.ones((1, 3), np.int32))] * 2
    result = evaluate_loss(fake_step, None, batches, mesh, partitioning.rules_for(mesh))
    assert result["loss"] == pytest.approx(2.0) and result["aux_loss"] == pytest.approx(0.1)
