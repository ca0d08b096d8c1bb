"""Chinchilla Approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta by Huber on log loss.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Section 3.3 and
Appendix D.2: minimise over (a, b, e, alpha, beta), with A = exp(a), B = exp(b), E = exp(e),

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

with L-BFGS from the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
a, b in {0, 5, ..., 25} (4,500 starts), keeping the best. The Huber terms are SUMMED:
Besiroglu et al. 2024 showed that averaging them made the original L-BFGS stop early
(N_opt exponent a = beta/(alpha+beta) ~ 0.46 instead of ~ 0.51 on the same data). Our optimiser's stopping
tests are scale-invariant, so summing and averaging give the same optimum; we sum anyway.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from analysis.lbfgs import minimize_batch
from analysis.load import AnalysisError

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


def init_grid() -> np.ndarray:
    """The paper's 4,500 starting points, rows (a, b, e, alpha, beta) in the fit's log space."""
    alphas = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.1, 5.0)
    grid = [(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, alphas, alphas)]
    return np.asarray(grid, dtype=np.float64)


def _grid_box() -> tuple[np.ndarray, np.ndarray]:
    g = init_grid()
    return g.min(axis=0), g.max(axis=0)


def huber_objective(theta_SP, log_n, log_d, log_loss, weights_Sn, delta=HUBER_DELTA, block=None):
    """Summed (weighted) Huber loss of log-loss residuals and its gradient, for S parameter rows.

    theta_SP rows are (a, b, e, alpha, beta); log_n, log_d, log_loss are [1, n]; weights_Sn is a
    scalar or [S, n]. Rows are processed in blocks (default: about 8,192 residuals each) so
    temporaries stay in cache (large [S, n] temporaries cost more in page faults than in
    arithmetic) while few points still make few blocks. Each row's result is independent of
    the other rows and of the blocking. Returns (f_S, grad_SP).
    """
    n_rows = theta_SP.shape[0]
    block = max(128, 8192 // log_n.size) if block is None else block
    f = np.empty(n_rows)
    grad = np.empty((n_rows, 5))
    ln_row, ld_row = log_n.ravel(), log_d.ravel()
    scalar_w = np.isscalar(weights_Sn)
    for lo in range(0, n_rows, block):
        hi = min(lo + block, n_rows)
        a, b, e, alpha, beta = (theta_SP[lo:hi, i : i + 1] for i in range(5))
        # No max-shift in the log-sum-exp: the terms stay far from overflow for any sensible
        # iterate, and an overflowing trial step gives f = inf, which the line search rejects.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            p1 = np.exp(a - alpha * log_n)
            p2 = np.exp(b - beta * log_d)
            p3 = np.exp(e)
            total = p1 + p2 + p3
            r = np.log(total) - log_loss
            psi = np.clip(r, -delta, delta)  # Huber'(r)
            hub = psi * (r - 0.5 * psi)  # r^2/2 inside delta, delta (|r| - delta/2) outside
            if not scalar_w or weights_Sn != 1.0:
                w = weights_Sn if scalar_w else weights_Sn[lo:hi]
                hub *= w
                psi *= w
            f[lo:hi] = hub.sum(axis=1)
            psi /= total
            g1 = psi * p1
            g2 = psi * p2
            grad[lo:hi, 0] = g1.sum(1)
            grad[lo:hi, 1] = g2.sum(1)
            grad[lo:hi, 2] = p3[:, 0] * psi.sum(1)
            # einsum, not a matrix product: BLAS may sum a row in another order depending on the rows
            # beside it, and then a problem's iterates would depend on which others share its batch
            grad[lo:hi, 3] = -np.einsum("sn,n->s", g1, ln_row)
            grad[lo:hi, 4] = -np.einsum("sn,n->s", g2, ld_row)
    f = np.where(np.isfinite(f) & np.all(np.isfinite(grad), axis=1), f, np.inf)
    return f, grad


def params_from_theta(theta) -> dict[str, float]:
    """(a, b, e, alpha, beta) -> {"E", "A", "B", "alpha", "beta"}."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def compute_optimal(params, flops, flops_per_token=(6.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """N_opt(C), D_opt(C) minimising L(N, D) subject to C = k N^c D (training FLOPs per token k N^c).

    With the default (k, c) = (6, 1), C = 6 N D and this is Hoffmann et al. 2022, eq. 4:
    N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta), b = alpha/(alpha+beta). In general, setting dL/dN = 0 along the budget
    gives N^(alpha + c beta) = alpha A C^beta / (c beta B k^beta), and D_opt = C / (k N_opt^c).
    Arrays broadcast, so params may hold bootstrap samples as arrays.
    """
    alpha, beta = np.asarray(params["alpha"]), np.asarray(params["beta"])
    big_a, big_b = np.asarray(params["A"]), np.asarray(params["B"])
    k, c = (float(v) for v in flops_per_token)
    flops = np.asarray(flops, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_n = (np.log(alpha * big_a / (c * beta * big_b)) - beta * np.log(k) + beta * np.log(flops)) / (alpha + c * beta)
        n_opt = np.exp(log_n)
        return n_opt, flops / (k * n_opt**c)


def fit_flops_per_token(n_params, tokens, flops) -> dict:
    """Power law C / D = k N^c through the runs (how a FLOP convention scales with the chosen N).

    Exact (k=6, c=1) for C = 6 N D; for "6N+attention" or N with embeddings it is a fit, and
    max_rel_error says how well it holds on the runs.
    """
    n = np.asarray(n_params, float)
    per_token = np.asarray(flops, float) / np.asarray(tokens, float)
    if np.unique(n).size < 2:
        return {"k": float(np.median(per_token / n)), "c": 1.0, "max_rel_error": float(np.ptp(per_token / n) / np.median(per_token / n))}
    c, log_k = np.polyfit(np.log(n), np.log(per_token), 1)
    pred = np.exp(log_k) * n**c
    return {"k": float(np.exp(log_k)), "c": float(c), "max_rel_error": float(np.max(np.abs(pred / per_token - 1)))}


def derived(params) -> dict[str, float]:
    """a, b, G of the compute-optimal allocation (works on floats or bootstrap arrays)."""
    alpha, beta = np.asarray(params["alpha"]), np.asarray(params["beta"])
    s = alpha + beta
    g = (alpha * np.asarray(params["A"]) / (beta * np.asarray(params["B"]))) ** (1.0 / s)
    return {"a": beta / s, "b": alpha / s, "G": g}


def predict(params, n_params, tokens) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta, in nats per token."""
    n = np.asarray(n_params, dtype=np.float64)
    d = np.asarray(tokens, dtype=np.float64)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


@dataclasses.dataclass(frozen=True)
class ParametricFit:
    """Result of one Approach-3 fit."""

    params: dict[str, float]
    theta: np.ndarray  # (a, b, e, alpha, beta)
    objective: float  # summed Huber loss at the optimum
    converged: bool
    n_starts: int
    n_converged: int
    n_iter: int
    best_start: np.ndarray  # grid point the winner started from
    start_on_grid_edge: bool  # every start that reached the optimum lies on the boundary of the grid box
    n_at_optimum: int  # starts whose end point ties with the best objective (relative 1e-9)
    optimum_outside_grid: bool  # the optimum lies outside the grid box (grid may be too small)
    local_optima: np.ndarray  # distinct end points, best first [k, 5] (bootstrap warm starts)

    def to_dict(self) -> dict:
        lo, hi = _grid_box()
        return {
            "params": self.params,
            "derived": {k: float(v) for k, v in derived(self.params).items()},
            "objective": self.objective,
            "loss": "sum of Huber(delta=1e-3) on log-loss residuals",
            "converged": self.converged,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "n_iter": self.n_iter,
            "best_start": dict(zip(("a", "b", "e", "alpha", "beta"), map(float, self.best_start))),
            "start_on_grid_edge": self.start_on_grid_edge,
            "n_starts_at_optimum": self.n_at_optimum,
            "optimum_outside_grid": self.optimum_outside_grid,
            "grid_box": {"low": lo.tolist(), "high": hi.tolist()},
        }


def _check_points(n_params, tokens, loss):
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in (n_params, tokens, loss)]
    if len({a.size for a in arrays}) != 1:
        raise AnalysisError(f"N, D and loss differ in length: {[a.size for a in arrays]}")
    for name, arr in zip(("N", "D", "loss"), arrays):
        bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
        if bad.size:
            raise AnalysisError(f"{name} must be finite and > 0; bad at positions {bad[:10].tolist()}")
    if arrays[0].size < 6:
        raise AnalysisError(f"Approach 3 fits 5 parameters and needs at least 6 points, got {arrays[0].size}")
    # Repeats (e.g. seeds) of one (N, D) add no information about the shape: with too few distinct
    # N or D, (A, alpha) or (B, beta) are not identified and the "optimum" is one of a continuum.
    n_pairs = len(set(zip(arrays[0].tolist(), arrays[1].tolist())))
    n_n, n_d = np.unique(arrays[0]).size, np.unique(arrays[1]).size
    if n_pairs < 6 or n_n < 3 or n_d < 3:
        raise AnalysisError(
            "Approach 3 fits 5 parameters and needs at least 6 distinct (N, D) points with at least 3 distinct N "
            f"and 3 distinct D; got {n_pairs} distinct points, {n_n} distinct N, {n_d} distinct D"
        )
    return arrays


def _distinct(theta_SP, f_S, k, tol=1e-3):
    order = np.argsort(f_S)
    kept = []
    for i in order:
        if not np.isfinite(f_S[i]):
            break
        if all(np.max(np.abs(theta_SP[i] - theta_SP[j])) > tol for j in kept):
            kept.append(i)
        if len(kept) == k:
            break
    return np.asarray(kept, dtype=int)


def fit_parametric(n_params, tokens, loss, *, starts=None, delta=HUBER_DELTA, max_iter=1000) -> ParametricFit:
    """Approach 3 from every start of ``starts`` (default: the paper's 4,500-point grid); best kept.

    n_params: N per point; tokens: D per point; loss: nats/token. Returns a ParametricFit.
    """
    log_n, log_d, log_l = (np.log(a)[None, :] for a in _check_points(n_params, tokens, loss))
    x0 = init_grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=np.float64))

    def vg(x_SP, rows):
        return huber_objective(x_SP, log_n, log_d, log_l, 1.0, delta)

    res = minimize_batch(vg, x0, max_iter=max_iter)
    f = np.where(np.isfinite(res.f_S), res.f_S, np.inf)
    best = int(np.argmin(f))
    lo, hi = _grid_box()
    start = x0[best]
    theta = res.x_SP[best]
    # many starts tie at the optimum; the flag asks whether ALL of them lie on the grid's boundary
    at_opt = f <= f[best] + 1e-9 * abs(f[best])
    on_edge = np.any(np.isclose(x0[at_opt], lo) | np.isclose(x0[at_opt], hi), axis=1)
    return ParametricFit(
        params=params_from_theta(theta),
        theta=theta.copy(),
        objective=float(f[best]),
        converged=bool(res.converged_S[best]),
        n_starts=int(x0.shape[0]),
        n_converged=int(res.converged_S.sum()),
        n_iter=int(res.n_iter_S[best]),
        best_start=start.copy(),
        start_on_grid_edge=bool(on_edge.all()),
        n_at_optimum=int(at_opt.sum()),
        optimum_outside_grid=bool(np.any(theta < lo - 1e-9) | np.any(theta > hi + 1e-9)),
        local_optima=res.x_SP[_distinct(res.x_SP, f, 8)],
    )


def bootstrap_parametric(
    n_params, tokens, loss, fit: ParametricFit, *, n_bootstrap=1000, seed=0, n_grid_starts=3, delta=HUBER_DELTA,
    counts_Bn=None,
) -> dict[str, np.ndarray]:
    """Refit Approach 3 on ``n_bootstrap`` resamples of the points (one point = one run).

    Each resample is a vector of multiplicities over the points, so all refits run as one
    batch. Warm starts (documented shortcut, not the full grid per refit): the full-data
    optimum, up to 2 other distinct local optima of the full fit, and ``n_grid_starts``
    random points of the paper grid; the best end point per resample is kept.
    counts_Bn: the resamples as [n_bootstrap, n] multiplicities (default: drawn from ``seed``), so
    callers can share one set of resamples between approaches.
    Returns {"E","A","B","alpha","beta","objective","converged"} arrays of length n_bootstrap.
    """
    log_n, log_d, log_l = (np.log(a)[None, :] for a in _check_points(n_params, tokens, loss))
    n = log_n.shape[1]
    rng = np.random.default_rng(seed)
    if counts_Bn is None:
        counts_Bn = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)
    counts_Bn = np.asarray(counts_Bn, dtype=np.float64)
    if counts_Bn.shape != (n_bootstrap, n):
        raise AnalysisError(f"counts_Bn has shape {counts_Bn.shape}, expected {(n_bootstrap, n)}")
    grid = init_grid()
    starts_KP = np.concatenate(
        [fit.local_optima[:3], grid[rng.choice(grid.shape[0], n_grid_starts, replace=False)]], axis=0
    )
    k = starts_KP.shape[0]
    x0 = np.tile(starts_KP, (n_bootstrap, 1))
    boot_of_row = np.repeat(np.arange(n_bootstrap), k)

    def vg(x_SP, rows):
        return huber_objective(x_SP, log_n, log_d, log_l, counts_Bn[boot_of_row[rows]], delta)

    res = minimize_batch(vg, x0)
    f_BK = np.where(np.isfinite(res.f_S), res.f_S, np.inf).reshape(n_bootstrap, k)
    best_B = np.argmin(f_BK, axis=1)
    idx = np.arange(n_bootstrap) * k + best_B
    theta_BP = res.x_SP[idx]
    out = {
        "E": np.exp(theta_BP[:, 2]),
        "A": np.exp(theta_BP[:, 0]),
        "B": np.exp(theta_BP[:, 1]),
        "alpha": theta_BP[:, 3],
        "beta": theta_BP[:, 4],
        "objective": f_BK[np.arange(n_bootstrap), best_B],
        "converged": res.converged_S[idx],
    }
    return out
