"""Chinchilla Approaches 1 (training-curve envelope) and 2 (IsoFLOP profiles).

Hoffmann et al. 2022, Sections 3.1 and 3.2. Both end in power laws N_opt = k_N C^a and
D_opt = k_D C^b fitted by least squares in log-log space.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from analysis.load import AnalysisError


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = k * C^exponent, fitted by least squares on (log C, log y)."""

    k: float
    exponent: float

    def __call__(self, flops):
        return self.k * np.asarray(flops, dtype=np.float64) ** self.exponent


def fit_power_law(flops, y, weights=None) -> PowerLaw:
    """Least-squares line through (log C, log y); needs at least 2 distinct C."""
    x, ly = np.log(np.asarray(flops, float)), np.log(np.asarray(y, float))
    if np.unique(x).size < 2:
        raise AnalysisError(f"a power law in C needs at least 2 distinct budgets, got {np.unique(x).size}")
    w = None if weights is None else np.sqrt(np.asarray(weights, float))
    slope, intercept = np.polyfit(x, ly, 1, w=w)
    return PowerLaw(k=float(np.exp(intercept)), exponent=float(slope))


# ----------------------------------------------------------------------------- curve interpolation


def interp_loglog(x_query, x, y):
    """Interpolate y(x) linearly in (log x, log y); NaN outside [min x, max x]."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x)
    lx, ly = np.log(x[order]), np.log(y[order])
    lq = np.log(np.asarray(x_query, float))
    out = np.exp(np.interp(lq, lx, ly))
    return np.where((lq >= lx[0] - 1e-12) & (lq <= lx[-1] + 1e-12), out, np.nan)


def curve_matrix(curves: pd.DataFrame, runs: pd.DataFrame, grid, *, flops_col="flops", n_col="n_params"):
    """Loss and tokens of every run interpolated onto the FLOP values ``grid``.

    curves needs columns run, tokens, loss and ``flops_col``; rows with NaN loss are ignored.
    Returns (loss_RK, tokens_RK) with NaN where the run's curve does not span the grid point.
    """
    grid = np.asarray(grid, float)
    loss = np.full((len(runs), grid.size), np.nan)
    tokens = np.full_like(loss, np.nan)
    groups = {name: g for name, g in curves.groupby("run")}
    for i, name in enumerate(runs["run"]):
        g = groups.get(name)
        if g is None:
            continue
        g = g[np.isfinite(g["loss"]) & (g[flops_col] > 0) & (g["loss"] > 0)]
        g = g.drop_duplicates(subset=flops_col, keep="last")
        if len(g) < 2:
            continue
        loss[i] = interp_loglog(grid, g[flops_col], g["loss"])
        if g["tokens"].gt(0).all():
            tokens[i] = interp_loglog(grid, g[flops_col], g["tokens"])
    return loss, tokens


# ----------------------------------------------------------------------------- Approach 1


def envelope_grid(curves: pd.DataFrame, *, flops_col="flops", n_buckets=100, lo=None, hi=None):
    """Log-spaced FLOP buckets over [lo, hi] (default: the full FLOP range of the curves).

    Callers pass lo = the smallest final compute of any run: below it every curve is an early
    part of a run, the smallest model is too large to be optimal, and the envelope flattens.
    """
    c = curves.loc[np.isfinite(curves["loss"]) & (curves[flops_col] > 0), flops_col]
    if c.empty:
        raise AnalysisError("no curve points with a finite loss and positive FLOPs")
    lo = c.min() if lo is None else max(lo, c.min())
    hi = c.max() if hi is None else min(hi, c.max())
    if not hi > lo:
        raise AnalysisError(f"empty FLOP range for the envelope: [{lo:.3g}, {hi:.3g}]")
    return np.geomspace(lo, hi, n_buckets)


def envelope_from_matrix(grid, loss_RK, tokens_RK, n_params_R, *, min_runs=2, include_R=None, drop_edge_sizes=True):
    """Per FLOP bucket, the run with the lowest loss among runs whose curves span it.

    Buckets spanned by fewer than ``min_runs`` (included) runs are dropped: at the ends of the
    FLOP range a single curve is the envelope by default, which says nothing about N_opt.
    So are buckets won by the smallest or the largest model (drop_edge_sizes): the optimum
    may lie beyond the sizes trained there.
    Returns a DataFrame flops, run_index, n_params, tokens, loss.
    """
    loss = loss_RK if include_R is None else np.where(include_R[:, None], loss_RK, np.nan)
    n_params_R = np.asarray(n_params_R, float)
    cover = np.isfinite(loss).sum(axis=0)
    ok = cover >= min_runs
    if drop_edge_sizes and ok.any():
        has = np.isfinite(loss).any(axis=1)
        winner = np.argmin(np.where(np.isfinite(loss), loss, np.inf), axis=0)
        edge = (n_params_R[winner] <= n_params_R[has].min()) | (n_params_R[winner] >= n_params_R[has].max())
        ok &= ~edge
    if not ok.any():
        return pd.DataFrame(columns=["flops", "run_index", "n_params", "tokens", "loss"])
    best = np.nanargmin(np.where(np.isfinite(loss[:, ok]), loss[:, ok], np.inf), axis=0)
    cols = np.flatnonzero(ok)
    return pd.DataFrame(
        {
            "flops": np.asarray(grid)[ok],
            "run_index": best,
            "n_params": n_params_R[best],
            "tokens": tokens_RK[best, cols],
            "loss": loss[best, cols],
        }
    )


def pareto_final_points(flops_R, loss_R, n_params_R, tokens_R):
    """Envelope of final points only (tables without curves): runs beating every cheaper run."""
    order = np.argsort(flops_R)
    best_so_far, keep = np.inf, []
    for i in order:
        if loss_R[i] < best_so_far:
            keep.append(i)
            best_so_far = loss_R[i]
    keep = np.asarray(keep, int)
    return pd.DataFrame(
        {"flops": flops_R[keep], "run_index": keep, "n_params": n_params_R[keep], "tokens": tokens_R[keep],
         "loss": loss_R[keep]}
    )  # fmt: skip


# ----------------------------------------------------------------------------- Approach 2


def auto_budgets(final_flops, *, gap_dex=0.1, min_runs=3):
    """Group runs' final FLOPs into IsoFLOP budgets (clusters separated by > ``gap_dex`` decades).

    Returns (budgets, tol_dex): cluster geometric means with at least ``min_runs`` members,
    and the largest distance in decades of a member from its budget (at least 0.02).
    """
    lc = np.sort(np.log10(np.asarray(final_flops, float)))
    clusters = np.split(lc, np.flatnonzero(np.diff(lc) > gap_dex) + 1)
    clusters = [c for c in clusters if c.size >= min_runs]
    budgets = np.array([10 ** c.mean() for c in clusters])
    tol = max([0.02] + [float(np.max(np.abs(c - c.mean()))) + 1e-9 for c in clusters])
    return budgets, tol


def isoflop_points(budgets, final_flops_R, final_loss_R, n_params_R, tokens_R, loss_RK=None, tokens_RK=None,
                   *, tol_dex=0.01, interpolate="auto", members=None):  # fmt: skip
    """Loss against N at each budget: runs ending within ``tol_dex`` decades of it use their final
    loss ("final"); other runs whose curves span it use their curve interpolated in log-log
    onto the budget ("interpolated"; loss_RK/tokens_RK from curve_matrix on ``budgets``).
    interpolate: "auto" adds interpolated points only to budgets with fewer than 3 model sizes
    among the final points (a mid-run loss comes from a learning-rate schedule stretched to a
    longer run, so it is not what a run trained to that budget reaches); "always"; "never".
    members: per budget, runs that belong to it (a loose group of final FLOPs): those not within
    tol_dex are interpolated onto it unless interpolate is "never".
    Returns a DataFrame budget_index, budget, run_index, n_params, tokens, loss, kind.
    """
    rows = []
    lf = np.log10(np.asarray(final_flops_R, float))
    n_params_R = np.asarray(n_params_R, float)
    for j, c in enumerate(budgets):
        near = np.abs(lf - np.log10(c)) <= tol_dex
        for i in np.flatnonzero(near):
            rows.append((j, c, i, n_params_R[i], tokens_R[i], final_loss_R[i], "final"))
        take = np.zeros_like(near)
        if loss_RK is not None and interpolate != "never":
            if members is not None:
                take[members[j]] = True
            if interpolate == "always" or np.unique(n_params_R[near]).size < 3:
                take[:] = True  # "auto": runs trained to a budget suffice; mid-run losses (other schedules) bias it
            take &= ~near & np.isfinite(loss_RK[:, j])
        for i in np.flatnonzero(take):
            rows.append((j, c, i, n_params_R[i], tokens_RK[i, j], loss_RK[i, j], "interpolated"))
    return pd.DataFrame(rows, columns=["budget_index", "budget", "run_index", "n_params", "tokens", "loss", "kind"])


def isoflop_groups(points: pd.DataFrame) -> list[tuple]:
    """Per budget (sorted): (budget, run_index, n_params, tokens, loss) arrays from isoflop_points."""
    return [
        (g["budget"].iloc[0], g["run_index"].to_numpy(), g["n_params"].to_numpy(float),
         g["tokens"].to_numpy(float), g["loss"].to_numpy(float))
        for _, g in points.groupby("budget_index", sort=True)
    ]  # fmt: skip
