"""Mixture of experts against closed forms and a NumPy reference: routing, capacity, auxiliary losses, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.model import EncoderDecoder, get_config, init_params
from t5lite.model.layers import MlpBlock
from t5lite.model.moe import MoeMlp, dispatch_and_combine, expert_capacity, load_balancing_loss, router_z_loss
from t5lite.train import optimizers, step


def _moe(**overrides):
    return get_config("tiny", mlp="moe", **{"num_experts": 4, **overrides})


def _init(cfg, x):
    return nn.meta.unbox(MoeMlp(cfg).init(jax.random.key(0), x, True)["params"])


def _apply(cfg, params, x, deterministic=True):
    out, sown = MoeMlp(cfg).apply({"params": params}, x, deterministic, mutable=["aux_loss"])
    return np.asarray(out), sown


def test_one_expert_with_room_for_every_token_is_the_dense_mlp():
    cfg = _moe(num_experts=1, expert_capacity_factor=1.0)
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.emb_dim))
    params = _init(cfg, x)
    dense = {name: {"kernel": p["kernel"][0]} for name, p in params["expert"].items()}  # the one expert's weights
    want = np.asarray(MlpBlock(cfg).apply({"params": dense}, x, True))
    for deterministic in (True, False):  # no capacity limit / capacity = every token of the row
        np.testing.assert_allclose(_apply(cfg, params, x, deterministic)[0], want, rtol=1e-5, atol=1e-6)


def test_outputs_are_the_gated_sum_of_the_top_k_experts():
    """NumPy reference: softmax router, top-2, renormalised gates, each expert a gated-GELU MLP."""
    cfg = _moe(experts_per_token=2)
    x = jax.random.normal(jax.random.key(2), (2, 6, cfg.emb_dim))
    params = _init(cfg, x)
    xs = np.asarray(x, np.float64)
    logits = xs @ np.asarray(params["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # noqa: E731
    w = {name: np.asarray(p["kernel"], np.float64) for name, p in params["expert"].items()}
    want = np.zeros_like(xs)
    for b in range(2):
        for s in range(6):
            top = np.argsort(-probs[b, s])[:2]
            for e in top:
                hidden = gelu(xs[b, s] @ w["wi_0"][e]) * (xs[b, s] @ w["wi_1"][e])
                want[b, s] += probs[b, s, e] / probs[b, s, top].sum() * (hidden @ w["wo"][e])
    np.testing.assert_allclose(_apply(cfg, params, x)[0], want, rtol=1e-4, atol=1e-5)
    # Capacity for every token (factor E / k): the dispatched path computes the same thing.
    roomy = cfg.replace(expert_capacity_factor=2.0)
    np.testing.assert_allclose(_apply(roomy, params, x, deterministic=False)[0], want, rtol=1e-4, atol=1e-5)


def test_capacity_rule_first_choices_first_then_token_order():
    # One row of 4 tokens, top-2, 3 experts, 2 slots each. First choices: experts 0, 0, 0, 1; second: 1, 2, 1, 2.
    expert_index = jnp.array([[[0, 1], [0, 2], [0, 1], [1, 2]]])
    gates = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]]])
    dispatch, combine = dispatch_and_combine(expert_index, gates, num_experts=3, capacity=2)
    # Expert 0: tokens 0, 1 take slots 0, 1; token 2's first choice is dropped (over capacity).
    # Expert 1: token 3's first choice takes slot 0, then token 0's second choice slot 1; token 2's is dropped.
    # Expert 2: token 1's second choice slot 0, token 3's slot 1.
    want = {(0, 0, 0): 0.6, (1, 0, 1): 0.7, (3, 1, 0): 0.8, (0, 1, 1): 0.4, (1, 2, 0): 0.3, (3, 2, 1): 0.2}
    expected = np.zeros((4, 3, 2))
    for (token, expert, slot), gate in want.items():
        expected[token, expert, slot] = gate
    np.testing.assert_allclose(combine[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(dispatch[0], expected > 0)
    assert not np.asarray(dispatch[0, 2]).any()  # token 2 lost both its choices
    assert expert_capacity(4, 3, 2, 0.75) == 2 and expert_capacity(4, 1, 1, 9.0) == 4


def test_a_token_over_capacity_passes_through_the_residual():
    cfg = _moe(num_experts=1, expert_capacity_factor=0.5)  # 1 expert, 2 slots for a row of 4 tokens
    x = jax.random.normal(jax.random.key(3), (1, 4, cfg.emb_dim))
    params = _init(cfg, x)
    out = _apply(cfg, params, x, deterministic=False)[0]
    dense = _apply(cfg, params, x, deterministic=True)[0]  # no capacity limit
    np.testing.assert_allclose(out[0, :2], dense[0, :2], rtol=1e-5, atol=1e-6)  # the first two tokens got slots
    np.testing.assert_array_equal(out[0, 2:], 0.0)  # the MLP adds nothing: x + 0 in the layer


def test_load_balancing_loss_is_the_switch_formula_by_hand():
    # 2 experts, one row of 4 tokens. Top-1 choices: 0, 0, 0, 1 -> f = (3/4, 1/4).
    probs = jnp.array([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]])
    # P = mean probs = (0.6, 0.4); loss = E * sum f * P = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert float(load_balancing_loss(probs, jnp.array([[[0], [0], [0], [1]]]))) == pytest.approx(1.1)
    uniform = jnp.full((1, 4, 2), 0.5)
    assert float(load_balancing_loss(uniform, jnp.array([[[0], [1], [0], [1]]]))) == pytest.approx(1.0)
    logits = jnp.array([[[0.0, np.log(3.0)]]])  # logsumexp = log 4
    assert float(router_z_loss(logits)) == pytest.approx(np.log(4.0) ** 2, rel=1e-6)


def test_the_router_losses_are_sown_weighted():
    cfg = _moe(moe_load_balancing_weight=0.5, moe_router_z_loss_weight=0.25)
    x = jax.random.normal(jax.random.key(4), (2, 5, cfg.emb_dim))
    params = _init(cfg, x)
    _, sown = _apply(cfg, params, x)
    logits = jnp.einsum("bsd,de->bse", x, params["router"]["kernel"])
    probs = jax.nn.softmax(logits)
    lb = load_balancing_loss(probs, jnp.argmax(probs, -1)[..., None])
    assert float(sown["aux_loss"]["load_balancing_loss"][0]) == pytest.approx(0.5 * float(lb), rel=1e-5)
    assert float(sown["aux_loss"]["router_z_loss"][0]) == pytest.approx(0.25 * float(router_z_loss(logits)), rel=1e-5)


# --- In the model and the train step -----------------------------------------------------------------


def _batch(rng, rows=4):
    targets = rng.integers(2, 500, (rows, 6)).astype(np.int32)
    return dict(encoder_input_tokens=rng.integers(2, 500, (rows, 8)).astype(np.int32), decoder_target_tokens=targets,
                decoder_input_tokens=np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], 1))


@pytest.mark.slow
def test_train_and_eval_steps_add_every_sown_aux_loss_and_report_it():
    cfg = _moe(moe_every=2, moe_router_z_loss_weight=1e-3)
    model, params = EncoderDecoder(cfg), init_params(cfg, jax.random.key(0))
    batch = _batch(np.random.default_rng(0))

    @jax.jit
    def reference(p):  # training mode (capacity) and eval mode (no limit): cross-entropy and what was sown
        out = []
        for training in (True, False):
            logits, sown = model.apply({"params": p}, **batch, enable_dropout=training, mutable=["aux_loss"],
                                       rngs={"dropout": jax.random.key(0)})
            mlps = sown["aux_loss"]["encoder"]["layers_1"]["mlp"], sown["aux_loss"]["decoder"]["layers_1"]["mlp"]
            out.append(dict(ce=step.cross_entropy_loss(logits, batch["decoder_target_tokens"])[0],
                            lb=sum(m["load_balancing_loss"][0] for m in mlps),
                            z=sum(m["router_z_loss"][0] for m in mlps)))
        return out

    train_ref, eval_ref = jax.device_get(reference(params))
    optimizer = optimizers.make_optimizer("adafactor", "constant", 0.01, 0)
    state = step.TrainState.create(params, optimizer)
    _, metrics = jax.jit(lambda s, b: step.train_step(s, b, model=model, optimizer=optimizer))(state, batch)
    assert float(metrics["aux_loss/load_balancing_loss"]) == pytest.approx(train_ref["lb"], rel=1e-5)
    assert float(metrics["aux_loss/router_z_loss"]) == pytest.approx(train_ref["z"], rel=1e-5)
    assert float(metrics["aux_loss"]) == pytest.approx(train_ref["lb"] + train_ref["z"], rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(train_ref["ce"] + train_ref["lb"] + train_ref["z"], rel=1e-5)

    sums = jax.jit(lambda p, b: step.eval_step(p, b, model=model))(params, batch)
    assert float(sums["loss_sum"] / sums["weight_sum"]) == pytest.approx(eval_ref["ce"], rel=1e-5)  # plain CE
    assert float(sums["aux_loss_sum"] / sums["weight_sum"]) == pytest.approx(eval_ref["lb"] + eval_ref["z"], rel=1e-5)


@pytest.mark.slow
def test_microbatches_give_the_same_update_with_experts():
    """Rows route independently, so 2 microbatches of 2 rows update exactly like one batch of 4."""
    cfg = _moe(moe_every=2, expert_capacity_factor=1.0)
    model, params = EncoderDecoder(cfg), init_params(cfg, jax.random.key(0))
    optimizer = optimizers.make_optimizer("adafactor", "constant", 0.01, 0)
    batch = _batch(np.random.default_rng(1))
    run = lambda m: jax.jit(lambda s, b: step.train_step(  # noqa: E731
        s, b, model=model, optimizer=optimizer, num_microbatches=m))(step.TrainState.create(params, optimizer), batch)
    (one, one_metrics), (two, two_metrics) = run(1), run(2)
    for key in ("loss", "aux_loss", "grad_norm"):
        assert float(two_metrics[key]) == pytest.approx(float(one_metrics[key]), rel=1e-5), key
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
