"""Scaling-law fits: recovery of known laws, the compute-optimal closed form, held-out predictions, plots."""

import math

import numpy as np
import pytest
from scipy import optimize

from t5lite.scaling import fit, plots

# Besiroglu et al. 2024's refit of Hoffmann et al.'s approach 3.
BESIROGLU = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def _law(E, A, B, alpha, beta):
    return fit.PowerLaw(E=E, scales=(A, B), exponents=(alpha, beta))


def _synthetic(noise: float, seed: int = 0):
    """Losses from the Besiroglu law on a 6 x 6 grid of N in [1e7, 1e10] and D in [1e9, 1e12], times lognormal noise."""
    n, d = (a.ravel() for a in np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6)))
    truth = _law(**BESIROGLU).predict(n, d)
    return n, d, truth * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.size))


@pytest.fixture
def coarse_grid(monkeypatch):
    """A smaller initialisation grid (still every start runs L-BFGS) for the tests that are not about the grid."""
    monkeypatch.setattr(fit, "SCALE_GRID", (0.0, 5.0, 10.0))
    monkeypatch.setattr(fit, "E_GRID", (0.0, 1.0))
    monkeypatch.setattr(fit, "EXPONENT_GRID", (0.25, 0.75))


def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_x, log_l = np.log(rng.uniform(1e6, 1e9, (2, 12))), np.log(rng.uniform(2, 5, 12))
    theta = np.array([5.0, 7.0, 0.3, 0.4, 0.3])
    for delta in (1e-3, 10.0):  # the L1 regime of the Huber loss and the quadratic one
        numeric = optimize.approx_fprime(theta, lambda t, d=delta: fit._objective(t, log_x, log_l, d)[0], 1e-7)
        np.testing.assert_allclose(fit._objective(theta, log_x, log_l, delta)[1], numeric, rtol=1e-4, atol=1e-6)
    # The Huber loss itself, against its definition.
    r = np.array([0.0005, -0.004])
    theta = np.array([-50.0, -50.0, 0.0, 0.0, 0.0])  # prediction = log(e^0 + ~0 + ~0) = 0
    value, _ = fit._objective(theta, np.zeros((2, 2)), -r, 1e-3)
    assert value == pytest.approx(0.5 * 0.0005 ** 2 + 1e-3 * (0.004 - 0.5e-3), rel=1e-9)


@pytest.mark.slow
def test_joint_fit_recovers_a_known_law_with_the_full_initialisation_grid():
    n, d, losses = _synthetic(noise=0.001)
    law, optima = fit.fit_power_law([n, d], losses, keep_optima=True)
    (A, B) = law.scales
    for got, want in ((law.E, BESIROGLU["E"]), (A, BESIROGLU["A"]), (B, BESIROGLU["B"])):
        assert abs(got / want - 1) < 0.05, (got, want)
    _, intervals = fit.bootstrap([n, d], losses, num_samples=100, seed=0, starts=optima)
    assert intervals["alpha"][0] <= BESIROGLU["alpha"] <= intervals["alpha"][1], intervals["alpha"]
    assert intervals["beta"][0] <= BESIROGLU["beta"] <= intervals["beta"][1], intervals["beta"]
    assert intervals["alpha"][1] - intervals["alpha"][0] < 0.02  # informative, not vacuous


def test_one_variable_fit_recovers_a_known_law(coarse_grid):
    x = np.logspace(5, 9, 9)
    losses = (2.0 + 300.0 / x ** 0.4) * np.exp(np.random.default_rng(1).normal(0, 0.0005, x.size))
    law = fit.fit_power_law([x], losses)
    assert law.E == pytest.approx(2.0, rel=0.02)
    assert law.scales[0] == pytest.approx(300.0, rel=0.1)
    assert law.exponents[0] == pytest.approx(0.4, abs=0.01)


def test_compute_optimal_allocation_of_besiroglu_et_al_at_1e21_flops():
    C = 1e21
    n_opt, d_opt = fit.compute_optimal(_law(**BESIROGLU), C)
    # Published: N* ~ 2.8e9 parameters, D* ~ 6.0e10 tokens.
    assert n_opt == pytest.approx(2.8e9, rel=0.02) and d_opt == pytest.approx(6.0e10, rel=0.02)
    assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-12)
    # Independently: minimise L(N, C / 6N) over log N numerically.
    _, A, B, alpha, beta = BESIROGLU.values()

    def loss_at(log_n):  # E is constant along the iso-FLOP line
        return A / math.exp(log_n) ** alpha + B / (C / (6 * math.exp(log_n))) ** beta

    numeric = math.exp(optimize.minimize_scalar(loss_at, bounds=(math.log(1e6), math.log(1e13)), method="bounded",
                                                options={"xatol": 1e-10}).x)
    assert n_opt == pytest.approx(numeric, rel=1e-4)
    # And the closed form written out here: G = (alpha A / (beta B))^(1/(alpha+beta)).
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    assert n_opt == pytest.approx(G * (C / 6) ** (beta / (alpha + beta)), rel=1e-12)
    assert fit.allocation_exponents(_law(**BESIROGLU))["a"] == pytest.approx(beta / (alpha + beta))


def _sweep_rows(noise=0.002):
    """summary.jsonl-like rows of a 4 x 3 sweep plus one larger held-out point, losses from a known law."""
    truth = _law(E=2.0, A=60.0, B=900.0, alpha=0.35, beta=0.45)
    rng = np.random.default_rng(3)
    rows = []
    for i, n in enumerate((1e5, 3e5, 1e6, 3e6, 1e7)):
        for d in ((1e7, 4e7, 1.6e8) if i < 4 else (4e7,)):
            loss = float(truth.predict(n, d) * np.exp(rng.normal(0, noise)))
            rows.append({"name": f"n{n:g}_d{d:g}", "status": "done", "held_out": i == 4, "params_non_embedding": n,
                         "params": 3 * n, "tokens": d, "eval_loss": loss, "train_loss": loss})
    rows.append({"name": "crashed", "status": "failed", "held_out": False, "params_non_embedding": 1e6, "params": 3e6,
                 "tokens": 1e7, "eval_loss": None, "train_loss": None})
    return truth, rows


def test_fit_sweep_predicts_the_held_out_point_and_draws_the_plots(coarse_grid, tmp_path):
    truth, rows = _sweep_rows()
    result = fit.fit_sweep(rows, bootstrap_samples=20)
    assert result["num_points"] == 12  # the failed and the held-out rows are not fitted
    held = result["held_out"][0]
    assert held["name"] == "n1e+07_d4e+07"
    assert held["relative_error"] == pytest.approx((held["predicted"] - held["observed"]) / held["observed"])
    assert abs(held["predicted"] / float(truth.predict(1e7, 4e7)) - 1) < 0.01
    assert held["predicted_interval"][0] <= held["predicted"] <= held["predicted_interval"][1]
    # L(N) uses each size's largest budget (4 sizes), L(D) each budget's largest size (3 budgets).
    assert len(result["params_only"]["points"]) == 4 and len(result["tokens_only"]["points"]) == 3
    for row in result["compute_optimal"]:
        assert 6 * row["params"] * row["tokens"] == pytest.approx(row["flops"], rel=1e-9)
    paths = plots.fit_plots(result, rows, str(tmp_path))
    for path in paths.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fit_sweep_refuses_too_few_points():
    from t5lite.errors import UserError
    _, rows = _sweep_rows()
    with pytest.raises(UserError, match="at least 6 finished points"):
        fit.fit_sweep(rows[:4])
