"""Batched L-BFGS in NumPy float64: many independent small problems minimised in lock-step.

Chinchilla Approach 3 starts L-BFGS from 4,500 grid points, and the bootstrap refits
the same 5-parameter model 1,000 times. Each problem is tiny (5 parameters), so a
per-start ``scipy.optimize.minimize`` loop spends its time in Python overhead. Here
every problem keeps its own iterate, curvature history and line search, but all
function evaluations happen in one vectorised call over the batch.

Stopping is scale-invariant (relative decrease of the objective and relative step
size), so multiplying the objective by a constant, e.g. averaging instead of summing
the Huber terms, does not make the optimiser stop early.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# value_and_grad(x_SP, rows_S) -> (f_S, g_SP): x_SP holds the iterates of problems rows_S
# (integer indices into the batch), so per-problem data (e.g. bootstrap weights) can be looked up.
ValueAndGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Final iterates of a batched minimisation (S problems, P parameters)."""

    x_SP: np.ndarray
    f_S: np.ndarray
    grad_SP: np.ndarray
    converged_S: np.ndarray  # stopped by the tolerance test (not the iteration cap)
    n_iter_S: np.ndarray


def _two_loop(g_SP, s_SMP, y_SMP, rho_SM, n_hist_S, head_S):
    """L-BFGS two-loop recursion, vectorised over problems; returns the search direction."""
    n_prob, m, _ = s_SMP.shape
    q_SP = g_SP.copy()
    alpha_SM = np.zeros((n_prob, m))
    rows = np.arange(n_prob)
    for k in range(m):  # newest to oldest
        idx_S = (head_S - 1 - k) % m
        use_S = k < n_hist_S
        s_SP, y_SP, rho_S = s_SMP[rows, idx_S], y_SMP[rows, idx_S], rho_SM[rows, idx_S]
        a_S = np.where(use_S, rho_S * np.einsum("sp,sp->s", s_SP, q_SP), 0.0)
        alpha_SM[:, k] = a_S
        q_SP -= a_S[:, None] * y_SP
    newest_S = (head_S - 1) % m
    s_new, y_new = s_SMP[rows, newest_S], y_SMP[rows, newest_S]
    yy_S = np.einsum("sp,sp->s", y_new, y_new)
    gamma_S = np.where(n_hist_S > 0, np.einsum("sp,sp->s", s_new, y_new) / np.maximum(yy_S, 1e-300), 1.0)
    r_SP = gamma_S[:, None] * q_SP
    for k in reversed(range(m)):  # oldest to newest
        idx_S = (head_S - 1 - k) % m
        use_S = k < n_hist_S
        s_SP, y_SP, rho_S = s_SMP[rows, idx_S], y_SMP[rows, idx_S], rho_SM[rows, idx_S]
        b_S = rho_S * np.einsum("sp,sp->s", y_SP, r_SP)
        r_SP += np.where(use_S, alpha_SM[:, k] - b_S, 0.0)[:, None] * s_SP
    return -r_SP


def minimize_batch(
    value_and_grad: ValueAndGrad,
    x0_SP: np.ndarray,
    *,
    max_iter: int = 1000,
    history: int = 10,
    ftol: float = 1e-11,
    xtol: float = 1e-8,
    max_linesearch: int = 40,
    c1: float = 1e-4,
    c2: float = 0.9,
    stall_window: int = 25,
    stall_tol: float = 1e-9,
) -> BatchResult:
    """Minimise S independent smooth functions with L-BFGS and a weak-Wolfe bisection line search.

    A problem stops when an accepted step changes the objective by at most ``ftol * |f|``
    AND moves every coordinate by at most ``xtol * (1 + |x|)``, or when its line search
    finds no decrease at all (a minimum at working precision). Both tests are invariant
    to scaling the objective; ``converged_S`` is False only for problems that hit
    ``max_iter`` or produced non-finite values.
    """
    x_SP = np.array(x0_SP, dtype=np.float64)
    n_prob, n_par = x_SP.shape
    f_S, g_SP = value_and_grad(x_SP, np.arange(n_prob))
    s_SMP = np.zeros((n_prob, history, n_par))
    y_SMP = np.zeros((n_prob, history, n_par))
    rho_SM = np.zeros((n_prob, history))
    n_hist_S = np.zeros(n_prob, int)
    head_S = np.zeros(n_prob, int)
    active_S = np.isfinite(f_S) & np.all(np.isfinite(g_SP), axis=1)
    converged_S = np.zeros(n_prob, bool)
    n_iter_S = np.zeros(n_prob, int)
    f_ref_S = f_S.copy()  # objective `stall_window` iterations ago (stall test)

    for _ in range(max_iter):
        act = np.flatnonzero(active_S)
        if act.size == 0:
            break
        xa, fa, ga = x_SP[act], f_S[act], g_SP[act]
        d = _two_loop(ga, s_SMP[act], y_SMP[act], rho_SM[act], n_hist_S[act], head_S[act])
        slope = np.einsum("sp,sp->s", d, ga)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            d[bad] = -ga[bad]
            slope[bad] = -np.einsum("sp,sp->s", ga[bad], ga[bad])
            n_hist_S[act[bad]] = 0
        # first iteration of a fresh history: keep the step length about unit in x
        t = np.where(n_hist_S[act] == 0, 1.0 / np.maximum(np.linalg.norm(d, axis=1), 1.0), 1.0)
        lo, hi = np.zeros_like(t), np.full_like(t, np.inf)
        done = np.zeros(act.size, bool)
        f_new, g_new = fa.copy(), ga.copy()
        for _ls in range(max_linesearch):
            todo = np.flatnonzero(~done)
            if todo.size == 0:
                break
            xt = xa[todo] + t[todo, None] * d[todo]
            ft, gt = value_and_grad(xt, act[todo])
            armijo_fail = ~(ft <= fa[todo] + c1 * t[todo] * slope[todo])  # also catches NaN
            curv_fail = np.einsum("sp,sp->s", gt, d[todo]) < c2 * slope[todo]
            ok = ~armijo_fail & ~curv_fail
            f_new[todo[ok]], g_new[todo[ok]] = ft[ok], gt[ok]
            done[todo[ok]] = True
            hi[todo[armijo_fail]] = t[todo[armijo_fail]]
            grow = ~armijo_fail & curv_fail
            lo[todo[grow]] = t[todo[grow]]
            # remember the best Armijo point in case the curvature test never passes
            f_new[todo[grow]], g_new[todo[grow]] = ft[grow], gt[grow]
            t_todo = t[todo]
            t[todo] = np.where(np.isfinite(hi[todo]), 0.5 * (lo[todo] + hi[todo]), 2.0 * lo[todo])
            t[todo[ok]] = t_todo[ok]
        # problems whose search never passed: fall back to the last Armijo point (lo) if any
        fallback = ~done & (lo > 0)
        t[fallback] = lo[fallback]
        moved = done | fallback
        stuck = ~moved  # no decrease possible along d: a minimum at working precision
        step = t[:, None] * d
        step[stuck] = 0.0
        x_new = xa + step
        f_acc = np.where(moved, f_new, fa)
        g_acc = np.where(moved[:, None], g_new, ga)
        # curvature pair update (skipped when it would break positive definiteness)
        y = g_acc - ga
        sy = np.einsum("sp,sp->s", step, y)
        upd = moved & (sy > 1e-12 * np.linalg.norm(step, axis=1) * np.linalg.norm(y, axis=1) + 1e-300)
        if upd.any():
            rows = act[upd]
            h = head_S[rows]
            s_SMP[rows, h], y_SMP[rows, h], rho_SM[rows, h] = step[upd], y[upd], 1.0 / sy[upd]
            head_S[rows] = (h + 1) % history
            n_hist_S[rows] = np.minimum(n_hist_S[rows] + 1, history)
        small_f = np.abs(fa - f_acc) <= ftol * np.maximum(np.abs(fa), 1e-300)
        small_x = np.all(np.abs(step) <= xtol * (1.0 + np.abs(xa)), axis=1)
        stop = (small_f & small_x) | stuck | ~np.isfinite(f_acc)
        x_SP[act], f_S[act], g_SP[act] = x_new, f_acc, g_acc
        n_iter_S[act] += 1
        converged_S[act[stop]] = np.isfinite(f_acc[stop])
        # stalled: creeping along a flat valley, relative progress over the window below
        # stall_tol; stopped but NOT counted as converged (a few such starts would otherwise
        # run to max_iter one line search at a time)
        check = (n_iter_S[act] % stall_window == 0) & ~stop
        stalled = check & (f_ref_S[act] - f_acc <= stall_tol * np.abs(f_acc))
        f_ref_S[act[check]] = f_acc[check]
        active_S[act[stop | stalled]] = False
    return BatchResult(x_SP=x_SP, f_S=f_S, grad_SP=g_SP, converged_S=converged_S, n_iter_S=n_iter_S)
