"""Scaling-law fits: L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's approach 3), L(N), L(D).

The joint fit follows Hoffmann et al. 2022 (appendix D.2) with Besiroglu et al. 2024's care:
minimise sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), delta = 1e-3,
over (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e, by L-BFGS from every point of a grid
of initialisations, keeping the best. The one-variable fits L(X) = E + A/X^alpha are the same
with one power term. Bootstrap intervals refit on points resampled with replacement (fixed seed).
The compute-optimal allocation under C = 6 N D is closed form:
N*(C) = G (C/6)^(beta/(alpha+beta)), D*(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

import dataclasses
import itertools
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.
EXPONENT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
E_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
SCALE_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
POLISHED = 8  # distinct best optima refined to tight tolerances; bootstrap refits start from them


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L = E + sum_k A_k / X_k^alpha_k over one (L(N) or L(D)) or two (L(N, D)) variables."""

    E: float
    scales: tuple  # A (and B)
    exponents: tuple  # alpha (and beta)
    objective: float = float("nan")  # the Huber loss at the optimum
    num_points: int = 0

    def predict(self, *xs) -> np.ndarray:
        total = self.E
        for scale, exponent, x in zip(self.scales, self.exponents, xs):
            total = total + scale / np.asarray(x, np.float64) ** exponent
        return total

    def to_dict(self) -> Dict[str, float]:
        names = ("A", "B") if len(self.scales) == 2 else ("A",)
        exps = ("alpha", "beta") if len(self.scales) == 2 else ("alpha",)
        return {"E": self.E, **dict(zip(names, self.scales)), **dict(zip(exps, self.exponents)),
                "huber_objective": self.objective, "num_points": self.num_points}


# ---------------------------------------------------------------------------------------------
# The objective and the multi-start L-BFGS.
# ---------------------------------------------------------------------------------------------

def _objective(theta: np.ndarray, log_x: np.ndarray, log_l: np.ndarray, delta: float):
    """Huber loss of the log-space residuals and its gradient; theta = (log scales..., e, exponents...).

    log_x: [K, P] (K power terms, P points); log L_i is predicted as LSE(s_k - alpha_k log x_ki, e).
    Written with bare NumPy ops: L-BFGS calls it ~10^5 times over the initialisation grid.
    """
    k = log_x.shape[0]
    terms = np.empty((k + 1, log_x.shape[1]))  # [K+1, P]
    terms[:k] = theta[:k, None] - theta[k + 1:, None] * log_x
    terms[k] = theta[k]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_l  # [P] residuals of log L
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()
    w *= np.clip(r, -delta, delta) / total  # d huber/d r (= clip(r)) times d LSE/d term (softmax weights)
    grad = np.empty(2 * k + 1)
    grad[:k] = w[:k].sum(axis=1)
    grad[k] = w[k].sum()
    grad[k + 1:] = -(w[:k] * log_x).sum(axis=1)
    return loss, grad


def _inits(k: int) -> np.ndarray:
    """The grid of starting points (scales_log..., e, exponents...) for K power terms."""
    grids = [SCALE_GRID] * k + [E_GRID] + [EXPONENT_GRID] * k
    return np.array(list(itertools.product(*grids)), np.float64)


def _lbfgs(start, log_x, log_l, delta, tight: bool):
    # Loose: scipy's default tolerances, at most 500 iterations (a start that wanders off costs no more).
    options = {"maxiter": 20_000, "ftol": 1e-15, "gtol": 1e-12} if tight else {"maxiter": 500}
    res = optimize.minimize(_objective, start, args=(log_x, log_l, delta), jac=True, method="L-BFGS-B",
                            options=options)
    return res.x, float(res.fun)


def _minimise(log_x, log_l, starts, delta, polish: int = POLISHED):
    """(theta, objective) of L-BFGS from every start, best first; the `polish` best distinct ones are refined
    to tight tolerances.

    scipy's default tolerances stop early on this flat objective (Besiroglu et al. found Chinchilla's
    fit had), hence the polish. BLAS runs single-threaded: for 5 parameters its thread pool only costs.
    """
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):
        results = [r for r in (_lbfgs(s, log_x, log_l, delta, False) for s in starts) if np.isfinite(r[1])]
        if not results:
            raise ValueError("every L-BFGS start diverged; the losses cannot be fitted by a power law")
        results.sort(key=lambda r: r[1])
        polished = [_lbfgs(theta, log_x, log_l, delta, True) for theta, _ in _distinct(results, polish)]
    return sorted([r for r in polished if np.isfinite(r[1])] + results, key=lambda r: r[1])


def _distinct(results, limit: int):
    """The first `limit` results whose parameters differ (results sorted best first)."""
    kept = []
    for theta, value in results:
        if all(np.max(np.abs(theta - other)) > 1e-3 for other, _ in kept):
            kept.append((theta, value))
        if len(kept) == limit:
            break
    return kept


def _as_law(theta, objective, k, num_points) -> PowerLaw:
    return PowerLaw(E=float(np.exp(theta[k])), scales=tuple(float(np.exp(s)) for s in theta[:k]),
                    exponents=tuple(float(x) for x in theta[k + 1:]), objective=objective, num_points=num_points)


def _prepare(xs: Sequence[Sequence[float]], losses: Sequence[float]):
    log_x = np.log(np.asarray(xs, np.float64).reshape(len(xs), -1))
    log_l = np.log(np.asarray(losses, np.float64))
    if log_x.shape[1] != log_l.shape[0]:
        raise ValueError(f"{log_x.shape[1]} points but {log_l.shape[0]} losses")
    if not (np.all(np.isfinite(log_x)) and np.all(np.isfinite(log_l))):
        raise ValueError("sizes and losses must be positive and finite")
    return log_x, log_l


def fit_power_law(xs: Sequence[Sequence[float]], losses: Sequence[float], delta: float = HUBER_DELTA,
                  starts: Optional[np.ndarray] = None, keep_optima: bool = False, polish: int = POLISHED):
    """Fits L = E + sum_k A_k / X_k^alpha_k; xs = [N] for L(N), [N, D] for L(N, D).

    Every point of the initialisation grid (or `starts`) runs L-BFGS; the lowest Huber loss wins.
    With keep_optima, also returns the distinct optima found, best first (bootstrap refits start there).
    """
    log_x, log_l = _prepare(xs, losses)
    k = log_x.shape[0]
    results = _minimise(log_x, log_l, _inits(k) if starts is None else starts, delta, polish)
    law = _as_law(*results[0], k, log_l.shape[0])
    if not keep_optima:
        return law
    return law, np.array([theta for theta, _ in _distinct(results, POLISHED)])


def bootstrap(xs: Sequence[Sequence[float]], losses: Sequence[float], num_samples: int = 100, seed: int = 0,
              delta: float = HUBER_DELTA, level: float = 0.95, starts: Optional[np.ndarray] = None):
    """Percentile intervals of every parameter from refits on resampled points.

    Returns (fits, intervals): the resampled fits and {name: (low, high)} at `level`. Each refit
    starts from `starts` (by default the best distinct optima of the full-data fit); only its best
    result is polished. A resample with fewer distinct points than the law has parameters is drawn
    again (it cannot identify them).
    """
    log_x, _ = _prepare(xs, losses)
    xs_arr, losses_arr = np.exp(log_x), np.asarray(losses, np.float64)
    if starts is None:
        _, starts = fit_power_law(xs_arr, losses_arr, delta, keep_optima=True)
    rng = np.random.default_rng(seed)
    fits = []
    num_params = 2 * log_x.shape[0] + 1
    for _ in range(num_samples):
        idx = rng.integers(0, losses_arr.shape[0], losses_arr.shape[0])
        while len(set(idx.tolist())) < min(num_params, losses_arr.shape[0]):  # cannot identify the law: redraw
            idx = rng.integers(0, losses_arr.shape[0], losses_arr.shape[0])
        fits.append(fit_power_law(xs_arr[:, idx], losses_arr[idx], delta, starts=starts, polish=1))
    return fits, intervals([f.to_dict() for f in fits], level)


def intervals(samples: Sequence[Dict[str, float]], level: float = 0.95) -> Dict[str, tuple]:
    """{name: (low, high)} percentile interval of each numeric field over the samples."""
    tail = 100 * (1 - level) / 2
    keys = [k for k in samples[0] if k not in ("huber_objective", "num_points")]
    return {k: tuple(float(v) for v in np.percentile([s[k] for s in samples], [tail, 100 - tail])) for k in keys}


# ---------------------------------------------------------------------------------------------
# Compute-optimal allocation.
# ---------------------------------------------------------------------------------------------

def compute_optimal(law: PowerLaw, flops) -> tuple:
    """(N*, D*) minimising L(N, D) subject to 6 N D = flops (Hoffmann et al. eq. 4)."""
    (A, B), (alpha, beta) = law.scales, law.exponents
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    c6 = np.asarray(flops, np.float64) / 6.0
    return G * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / G


def allocation_exponents(law: PowerLaw) -> Dict[str, float]:
    """N* ~ C^a and D* ~ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    alpha, beta = law.exponents
    return {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


# ---------------------------------------------------------------------------------------------
# Fitting a finished sweep (rows of summary.jsonl).
# ---------------------------------------------------------------------------------------------

MIN_JOINT_POINTS = 6  # five parameters, and at least one residual degree of freedom


def _largest_other(rows, key: str, other: str):
    """For each value of `key`, the rows with the largest `other` (L(N) at each N's largest D, and vice versa)."""
    best = {}
    for r in rows:
        best[r[key]] = max(best.get(r[key], 0), r[other])
    return [r for r in rows if r[other] == best[r[key]]]


def _one_variable(rows, key: str, other: str, loss: str, samples: int, seed: int) -> Optional[dict]:
    """L(X) = E + A / X^alpha on each X's largest-other slice, with bootstrap intervals (None: < 3 values of X)."""
    picked = _largest_other(rows, key, other)
    if len({r[key] for r in picked}) < 3:
        return None
    xs, losses = [[r[key] for r in picked]], [r[loss] for r in picked]
    law, optima = fit_power_law(xs, losses, keep_optima=True)
    # Through exactly 3 points the law is determined, and resampling them says nothing: no intervals.
    ci = bootstrap(xs, losses, samples, seed, starts=optima)[1] if len(picked) > 3 else None
    return {**law.to_dict(), "intervals": ci, "points": [r["name"] for r in picked]}


def _budgets(flops: np.ndarray) -> np.ndarray:
    """Powers of ten from the sweep's smallest 6ND to 1000x its largest: where the fit is read and extrapolated."""
    return 10.0 ** np.arange(np.floor(np.log10(flops.min())), np.ceil(np.log10(flops.max())) + 4)


def fit_sweep(rows: Sequence[dict], loss: str = "eval_loss", params: str = "params_non_embedding",
              tokens: str = "tokens", bootstrap_samples: int = 100, seed: int = 0) -> dict:
    """Fits L(N, D), L(N) and L(D) to the finished, not-held-out rows; predicts the held-out ones.

    N = row[params] (non-embedding by default), D = row[tokens]. Returns what fit.json holds: the
    laws with bootstrap intervals, the compute-optimal allocation at powers of ten of C = 6 N D,
    and for each held-out point its observed and predicted loss (with the bootstrap interval).
    """
    from t5lite.errors import UserError
    usable = [r for r in rows if r.get("status") == "done" and r.get(loss) is not None and r.get(params)]
    train = [r for r in usable if not r.get("held_out")]
    if len(train) < MIN_JOINT_POINTS or len({r[params] for r in train}) < 2 or len({r[tokens] for r in train}) < 2:
        raise UserError(f"the L(N, D) fit needs at least {MIN_JOINT_POINTS} finished points with {loss} over 2+ model "
                        f"sizes and 2+ token budgets; this sweep has {len(train)}")
    n, d, losses = (np.array([r[k] for r in train], np.float64) for k in (params, tokens, loss))
    joint, optima = fit_power_law([n, d], losses, keep_optima=True)
    samples, ci = bootstrap([n, d], losses, bootstrap_samples, seed, starts=optima)
    exponents = [allocation_exponents(s) for s in samples]
    ci.update(intervals(exponents))
    budgets = _budgets(6 * n * d)
    optimal = []
    for c in budgets:
        n_opt, d_opt = compute_optimal(joint, c)
        boot = [compute_optimal(s, c) for s in samples]
        optimal.append({"flops": float(c), "params": float(n_opt), "tokens": float(d_opt),
                        "loss": float(joint.predict(n_opt, d_opt)),
                        "params_interval": tuple(np.percentile([b[0] for b in boot], [2.5, 97.5]).tolist()),
                        "tokens_interval": tuple(np.percentile([b[1] for b in boot], [2.5, 97.5]).tolist())})
    held_out = []
    for r in usable:
        if r.get("held_out"):
            predicted = float(joint.predict(r[params], r[tokens]))
            boot = [float(s.predict(r[params], r[tokens])) for s in samples]
            held_out.append({"name": r["name"], "params": r[params], "tokens": r[tokens], "observed": r[loss],
                             "predicted": predicted, "predicted_interval": tuple(np.percentile(boot, [2.5, 97.5])),
                             "relative_error": (predicted - r[loss]) / r[loss]})
    residuals = np.log(joint.predict(n, d)) - np.log(losses)
    return {"loss": loss, "params": params, "tokens": tokens, "num_points": len(train),
            "bootstrap_samples": bootstrap_samples, "seed": seed, "huber_delta": HUBER_DELTA,
            "joint": {**joint.to_dict(), **allocation_exponents(joint), "intervals": ci,
                      "rms_log_residual": float(np.sqrt(np.mean(residuals ** 2)))},
            "params_only": _one_variable(train, params, tokens, loss, bootstrap_samples, seed),
            "tokens_only": _one_variable(train, tokens, params, loss, bootstrap_samples, seed),
            "compute_optimal": optimal, "held_out": held_out}
