"""Chinchilla Approach 2 without parabola bias: each IsoFLOP minimum located locally.

A parabola through a whole IsoFLOP profile (Hoffmann et al. 2022, Section 3.2) is biased when
the profile is asymmetric in log N and the sizes do not sit symmetrically around the minimum
in the same way at every budget; the bias grows with the spread of sizes. Porian et al. 2024
("Resolving Discrepancies in Compute-Optimal Scaling of Language Models") locate each budget's
minimum on an Akima interpolation of loss over log N, estimate each minimum's uncertainty by
re-locating it on profiles perturbed by the seed-to-seed noise of the losses, and fit N_opt(C)
by least squares weighted by the inverse variances.

Methods (``approach2=`` / ``--approach2``):
- "local" (default): quadratic regression in ln N with Gaussian weights (bandwidth a quarter of
  the profile's ln N range) centred on its own vertex, started at the Akima minimum and iterated.
  A window centred on the minimum gives every budget the same small bias (it cancels in the
  exponent), while the fit still averages the noise of several sizes. On synthetic sweeps
  (benchmarks/interval_coverage.py, tests) it is as unbiased as Akima and 5x less noisy.
- "akima": the minimum of the Akima interpolant itself (Porian et al.): no shape assumed, but it
  passes through every noisy loss, so at 0.3% noise its exponent scatters by ~0.04.
- "parabola": Hoffmann et al.'s whole-profile parabola, unweighted, for comparison.
The minima of "local" and "akima" are weighted by their inverse variances in the power-law fits.

The bootstrap perturbs every run's ln loss by the estimated seed noise and refits, so no
resample loses a budget or a size (a global resample of runs dropped a size that a 4-size
profile needs in a large share of resamples).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from analysis import approaches as ap
from analysis.bootstrap import DEFAULT_PERCENTILES, intervals
from analysis.load import AnalysisError

METHODS = ("local", "akima", "parabola")
DEFAULT_METHOD = "local"
BUDGET_TOL_DEX = 0.01  # runs share a budget when their final FLOPs agree within this many decades
LOCAL_BANDWIDTH = 0.25  # "local": Gaussian weight scale, as a fraction of the profile's ln N range
N_WEIGHT_DRAWS = 400  # perturbed profiles per budget for the uncertainty of its minimum


# ----------------------------------------------------------------------------- Akima interpolation


def akima_slopes(x, y) -> np.ndarray:
    """Akima (1970) derivatives at the nodes x (increasing, >= 3) of y [..., n].

    Segment slopes m_i are extended by two on each side (m_-1 = 2 m_0 - m_1, ...); the
    derivative at node i is (|m_i+1 - m_i| m_i-1 + |m_i-1 - m_i-2| m_i) / (sum of the weights),
    or (m_i-1 + m_i) / 2 where both weights vanish (as scipy's Akima1DInterpolator).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 1 or x.size < 3 or not np.all(np.diff(x) > 0):
        raise AnalysisError(f"Akima interpolation needs >= 3 strictly increasing nodes, got {x.tolist()}")
    m = np.diff(y, axis=-1) / np.diff(x)
    left1 = 2 * m[..., :1] - m[..., 1:2]
    left2 = 2 * left1 - m[..., :1]
    right1 = 2 * m[..., -1:] - m[..., -2:-1]
    right2 = 2 * right1 - m[..., -1:]
    m = np.concatenate([left2, left1, m, right1, right2], axis=-1)  # m[k] is segment k - 2
    dm = np.abs(np.diff(m, axis=-1))
    w1, w2 = dm[..., 2:], dm[..., :-2]  # |m_i+1 - m_i|, |m_i-1 - m_i-2|
    w = w1 + w2
    fill = 0.5 * (m[..., 3:] + m[..., :-3])
    ok = w > 1e-9 * np.max(w, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (w1 * m[..., 1:-2] + w2 * m[..., 2:-1]) / w
    return np.where(ok, t, fill)


def _cubic_coefficients(x, y):
    """Per interval i: (y_i, t_i, c2, c3) of y_i + t_i s + c2 s^2 + c3 s^3, s = x - x_i."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    t = akima_slopes(x, y)
    h = np.diff(x)
    m = np.diff(y, axis=-1) / h
    t0, t1 = t[..., :-1], t[..., 1:]
    return y[..., :-1], t0, (3 * m - 2 * t0 - t1) / h, (t0 + t1 - 2 * m) / h**2


def akima(x, y, xq) -> np.ndarray:
    """Akima interpolant of y [..., n] at nodes x, evaluated at xq (clamped to [x_0, x_-1])."""
    x = np.asarray(x, float)
    c0, c1, c2, c3 = _cubic_coefficients(x, y)
    xq = np.clip(np.asarray(xq, float), x[0], x[-1])
    i = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, x.size - 2)
    s = xq - x[i]
    return c0[..., i] + s * (c1[..., i] + s * (c2[..., i] + s * c3[..., i]))


def akima_minimum(x, y) -> tuple[np.ndarray, np.ndarray]:
    """(x*, y*): the minimum of the Akima interpolant of y [..., n] over [x_0, x_-1].

    Each interval's cubic is minimised exactly: its ends and the roots of its derivative.
    """
    x = np.asarray(x, float)
    c0, c1, c2, c3 = _cubic_coefficients(x, y)
    h = np.diff(x)
    a, b, c = 3 * c3, 2 * c2, c1  # derivative a s^2 + b s + c
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        disc = b * b - 4 * a * c
        q = -0.5 * (b + np.where(b >= 0, 1.0, -1.0) * np.sqrt(disc))
        roots = [q / a, c / q]  # stable pair; c / q is the root of the linear case a = 0
    s = np.stack([np.zeros_like(c0), np.broadcast_to(h, c0.shape)] + roots, axis=-1)  # [..., n-1, 4]
    s = np.where(np.isfinite(s) & (s >= 0) & (s <= h[:, None]), s, np.nan)
    val = c0[..., None] + s * (c1[..., None] + s * (c2[..., None] + s * c3[..., None]))
    val = np.where(np.isfinite(val), val, np.inf).reshape(*val.shape[:-2], -1)
    k = np.argmin(val, axis=-1)
    s_best = np.take_along_axis(s.reshape(val.shape), k[..., None], axis=-1)[..., 0]
    return x[k // 4] + s_best, np.take_along_axis(val, k[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------- budgets


@dataclasses.dataclass(frozen=True)
class BudgetGroup:
    """Runs whose final FLOPs cluster together. tight: all within tol_dex of the budget."""

    budget: float
    members: np.ndarray  # run indices
    spread_dex: float  # largest distance in decades of a member from the budget
    tight: bool


def budget_groups(final_flops, *, tol_dex=BUDGET_TOL_DEX, gap_dex=0.1, min_runs=3) -> list[BudgetGroup]:
    """Clusters of final FLOPs (split at gaps > gap_dex decades) with >= min_runs runs.

    A tight cluster (every run within tol_dex decades of the geometric mean) is a budget at
    that mean. A loose one gets the smallest member's FLOPs as its budget, the one point every
    member's training curve reaches; members ending later must be interpolated onto it.
    """
    lc = np.log10(np.asarray(final_flops, float))
    order = np.argsort(lc)
    out = []
    for idx in np.split(order, np.flatnonzero(np.diff(lc[order]) > gap_dex) + 1):
        if idx.size < min_runs:
            continue
        centre = lc[idx].mean()
        if np.max(np.abs(lc[idx] - centre)) <= tol_dex:
            out.append(BudgetGroup(float(10**centre), idx, float(np.max(np.abs(lc[idx] - centre))), True))
        else:
            lo = lc[idx].min()
            out.append(BudgetGroup(float(10**lo), idx, float(lc[idx].max() - lo), False))
    return out


# ----------------------------------------------------------------------------- profiles and their minima


@dataclasses.dataclass(frozen=True)
class Profile:
    """One budget's IsoFLOP profile, runs at the same N averaged (log loss)."""

    budget: float
    log_n: np.ndarray  # distinct ln N, increasing
    log_loss: np.ndarray  # mean ln loss per size
    counts: np.ndarray  # runs per size
    tokens_line: tuple[float, float]  # (slope, intercept) of ln D against ln N
    ss_within: float  # sum of squared deviations of ln loss from its size's mean
    n_runs: int

    @property
    def bracketed(self) -> bool:
        """The lowest loss is at neither the smallest nor the largest size."""
        k = int(np.argmin(self.log_loss))
        return 0 < k < self.log_n.size - 1

    def tokens_at(self, log_n):
        s, i0 = self.tokens_line
        return np.exp(i0 + s * np.asarray(log_n, float))


def make_profile(budget, n_params, tokens, loss) -> Profile:
    x, ll = np.log(np.asarray(n_params, float)), np.log(np.asarray(loss, float))
    ux, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    mean = np.bincount(inv, ll) / counts
    line = (0.0, float(np.log(np.mean(tokens)))) if ux.size < 2 else tuple(np.polyfit(x, np.log(np.asarray(tokens, float)), 1))
    return Profile(float(budget), ux, mean, counts, (float(line[0]), float(line[1])),
                   float(np.sum((ll - mean[inv]) ** 2)), int(x.size))  # fmt: skip


def _quadratic_vertex(x, y, w):
    """Weighted least-squares parabola y ~ c0 + c1 x + c2 x^2 per row of y, w [..., n]: (vertex, value, c2)."""
    xp = x ** np.arange(5)[:, None]  # [5, n]
    mom = np.einsum("...n,kn->...k", w, xp)  # sum w x^k, k = 0..4
    rhs = np.einsum("...n,kn->...k", w * y, xp[:3])
    mat = np.stack([mom[..., i : i + 3] for i in range(3)], axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.abs(np.linalg.det(mat)) > 1e-300
        c = np.linalg.solve(np.where(ok[..., None, None], mat, np.eye(3)), rhs[..., None])[..., 0]
        c0, c1, c2 = c[..., 0], c[..., 1], c[..., 2]
        xs = np.where(ok & (c2 > 0), -c1 / (2 * c2), np.nan)
    return xs, c0 - c1 * c1 / (4 * c2), c2


def local_minimum(x, y, counts=None, *, bandwidth=LOCAL_BANDWIDTH, max_iter=50) -> tuple[np.ndarray, np.ndarray]:
    """(x*, y*) of y [..., n] over nodes x: Gaussian-weighted local parabola re-centred on its vertex.

    Starts at the Akima minimum; each step refits with weights counts * exp(-((x - x*) / h)^2 / 2),
    h = bandwidth * (x_-1 - x_0), and moves x* to the vertex (clipped to [x_0, x_-1]). Rows whose
    local parabola is not convex keep the Akima minimum.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    counts = np.ones_like(x) if counts is None else np.asarray(counts, float)
    xa, ya = akima_minimum(x, y)
    centre = x.mean()
    xc, h = x - centre, bandwidth * (x[-1] - x[0])
    cur = xa - centre
    val = ya
    for _ in range(max_iter):
        w = counts * np.exp(-0.5 * ((xc - cur[..., None]) / h) ** 2)
        xs, vs, _ = _quadratic_vertex(xc, y, w)
        new = np.clip(np.where(np.isfinite(xs), xs, xa - centre), xc[0], xc[-1])
        val = np.where(np.isfinite(xs), vs, ya)
        done = np.max(np.abs(new - cur), initial=0.0) < 1e-7
        cur = new
        if done:
            break
    return cur + centre, val


def locate_minimum(prof: Profile, log_loss, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(ln N*, loss*) of profiles with the sizes of ``prof`` and ln losses log_loss [..., n].

    local: local_minimum; akima: the minimum of the Akima interpolant of loss over ln N;
    parabola: the vertex of the least-squares parabola in ln N (runs per size as weights), NaN
    where it is not convex.
    """
    y = np.exp(np.asarray(log_loss, float))
    if method == "akima":
        return akima_minimum(prof.log_n, y)
    if method == "local":
        return local_minimum(prof.log_n, y, prof.counts)
    xc = prof.log_n - prof.log_n.mean()
    xs, vs, _ = _quadratic_vertex(xc, y, np.broadcast_to(prof.counts, y.shape))
    return xs + prof.log_n.mean(), vs


def parabola_coefficients(prof: Profile) -> tuple[float, float, float]:
    """(c2, c1, c0) of the parabola locate_minimum(method="parabola") uses (for figures)."""
    x = prof.log_n
    w = np.sqrt(prof.counts)
    c2, c1, c0 = np.polyfit(x, np.exp(prof.log_loss), 2, w=w)
    return float(c2), float(c1), float(c0)


def loss_noise(profiles: list[Profile]) -> dict:
    """Std of ln loss between seeds: from repeated runs of one size if there are >= 2 degrees of
    freedom of them, else from the residuals of a parabola per profile (>= 4 sizes), pooled.

    Returns {"sigma", "df", "source"}; sigma None where neither estimate exists.
    """
    df_rep = sum(p.n_runs - p.log_n.size for p in profiles)
    if df_rep >= 2:
        ss = sum(p.ss_within for p in profiles)
        return {"sigma": float(np.sqrt(ss / df_rep)), "df": int(df_rep), "source": "runs repeated at one size and budget"}
    ss, df = 0.0, 0
    for p in profiles:
        if p.log_n.size < 4:
            continue
        coef = np.polyfit(p.log_n, p.log_loss, 2, w=np.sqrt(p.counts))
        ss += float(np.sum(p.counts * (np.polyval(coef, p.log_n) - p.log_loss) ** 2)) + p.ss_within
        df += p.n_runs - 3
    if df == 0:
        return {"sigma": None, "df": 0, "source": "none: no budget has >= 4 sizes or repeated runs"}
    return {"sigma": float(np.sqrt(ss / df)), "df": int(df), "source": "residuals of a parabola in ln N per budget, pooled"}


def perturbed_minima(profiles, method, sigma, n_draws, rng, df=None) -> np.ndarray:
    """ln N* of every profile re-located on n_draws perturbed copies: [n_draws, n_budgets].

    Each run's ln loss moves by sigma * z; a size with k runs averages them (sigma / sqrt(k)).
    df: degrees of freedom of the estimate sigma; each draw then uses its own noise level
    sigma * sqrt(df / chi2_df), so a noise level estimated from few points widens the interval
    as a t distribution would (else intervals from 3 degrees of freedom cover ~10% too little).
    """
    out = np.empty((n_draws, len(profiles)))
    scale = np.full((n_draws, 1), float(sigma))
    if df:
        scale *= np.sqrt(df / rng.chisquare(df, size=(n_draws, 1)))
    for j, p in enumerate(profiles):
        z = rng.standard_normal((n_draws, p.log_n.size)) * (scale / np.sqrt(p.counts))
        out[:, j] = locate_minimum(p, p.log_loss[None, :] + z, method)[0]
    return out


def weighted_lines(x, y_BJ, w_J):
    """Weighted least-squares lines y = i0 + s x for every row of y_BJ (NaN entries left out).

    Returns (slope_B, intercept_B); NaN where a row has < 2 distinct finite points.
    """
    x = np.asarray(x, float)[None, :]
    y = np.atleast_2d(np.asarray(y_BJ, float))
    w = np.where(np.isfinite(y), np.asarray(w_J, float)[None, :], 0.0)
    y0 = np.where(np.isfinite(y), y, 0.0)
    sw = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = (w * x).sum(axis=1) / sw
        ym = (w * y0).sum(axis=1) / sw
        sxx = (w * (x - xm[:, None]) ** 2).sum(axis=1)
        slope = (w * (x - xm[:, None]) * (y0 - ym[:, None])).sum(axis=1) / sxx
    enough = (np.isfinite(y) & (w > 0)).sum(axis=1) >= 2
    slope = np.where(enough & (sxx > 0), slope, np.nan)
    return slope, ym - slope * xm


# ----------------------------------------------------------------------------- Approach 2


def _budget_points(pts, isoflop_budgets, interpolate, warn):
    """(iso budgets, IsoFLOP points, source text): runs grouped into budgets within BUDGET_TOL_DEX."""
    p = pts.points
    n_r, d_r, c_r, l_r = (p[c].to_numpy(float) for c in ("n_params", "tokens", "flops", "loss"))
    names = p["run"].to_numpy()
    members, curves_at, refused = None, None, 0
    if isoflop_budgets is not None:
        iso, source = np.asarray(isoflop_budgets, float), "given"
    else:
        groups, kept = budget_groups(c_r), []
        source = f"runs grouped by final FLOPs within {BUDGET_TOL_DEX} decades"
        if pts.has_curves and groups:
            curves_at = ap.curve_matrix(pts.curves, p, [g.budget for g in groups], flops_col="flops")
        loss_RK = None if curves_at is None else curves_at[0]
        for j, g in enumerate(groups):
            late = g.members[np.abs(np.log10(c_r[g.members] / g.budget)) > BUDGET_TOL_DEX]
            if late.size == 0:
                kept.append(j)
                continue
            listed = ", ".join(f"{names[i]} ({c_r[i]:.4g})" for i in g.members)
            why = None
            if interpolate == "never":
                why = "interpolate=never"
            elif loss_RK is None:
                why = "the data has no training curves to interpolate them onto one budget"
            elif not np.all(np.isfinite(loss_RK[late, j])):
                why = "the training curves of " + ", ".join(names[i] for i in late if not np.isfinite(loss_RK[i, j])) + " do not reach it"
            if why:
                warn(f"approach 2: runs {listed} end {g.spread_dex:.3f} decades apart in FLOPs, more than the "
                     f"{BUDGET_TOL_DEX} allowed for one budget; refused as a budget ({why})")  # fmt: skip
                refused += 1
                continue
            warn(f"approach 2: runs {listed} end {g.spread_dex:.3f} decades apart in FLOPs (more than "
                 f"{BUDGET_TOL_DEX}); budget {g.budget:.4g} FLOPs uses the training curves of the later ones "
                 "interpolated onto it")  # fmt: skip
            kept.append(j)
        iso = np.array([groups[j].budget for j in kept])
        members = [groups[j].members for j in kept]
        if curves_at is not None:
            curves_at = tuple(m[:, kept] for m in curves_at)
        if len(groups) < 2 and pts.has_curves:  # not an IsoFLOP grid
            iso, members, curves_at = _curve_budgets(pts), None, None
            source = "log-spaced budgets spanned by >= 3 training curves"
    if iso.size < 2:
        raise AnalysisError(
            "approach 2 needs >= 2 IsoFLOP budgets with >= 3 runs each; the runs' FLOPs do not group "
            "that way (give --isoflop-budgets C1 C2 ... / isoflop_budgets=[...], or train an IsoFLOP grid)"
            + (f"; {refused} group(s) of runs refused as budgets, see the warnings" if refused else "")
        )
    loss_RK = tok_RK = None
    if pts.has_curves:
        loss_RK, tok_RK = curves_at or ap.curve_matrix(pts.curves, p, iso, flops_col="flops")
    iso_pts = ap.isoflop_points(iso, c_r, l_r, n_r, d_r, loss_RK, tok_RK, tol_dex=BUDGET_TOL_DEX,
                                interpolate=interpolate, members=members)  # fmt: skip
    return iso, iso_pts, source


def _curve_budgets(pts, min_runs=3, n=6):
    """Budgets spanned by >= min_runs curves, log-spaced (for sweeps that are not IsoFLOP grids)."""
    ranges = pts.curves.groupby("run")["flops"].agg(["min", "max"])
    if len(ranges) < min_runs:
        return np.array([])
    lo = np.sort(ranges["min"].to_numpy())[min_runs - 1]
    hi = np.sort(ranges["max"].to_numpy())[::-1][min_runs - 1]
    return np.geomspace(lo, hi, n) if hi > lo * 1.5 else np.array([])


def _power_samples(slope, intercept, budgets):
    return np.exp(intercept[:, None]) * np.asarray(budgets, float)[None, :] ** slope[:, None]


def _minima(used, method, sigma, rng):
    """ln N*, loss* of each used profile by ``method``, the sd of ln N* under the seed noise
    (N_WEIGHT_DRAWS perturbed copies; NaN without a noise estimate) and the power-law weights
    (inverse variances for local and akima where every sd is > 0; 1 otherwise)."""
    xs, ls = np.array([[float(v) for v in locate_minimum(p, p.log_loss, method)] for p in used]).T
    sd = np.full(len(used), np.nan)
    if sigma:
        sd = np.nanstd(perturbed_minima(used, method, sigma, N_WEIGHT_DRAWS, rng), axis=0)
    weighted = method != "parabola" and bool(np.all(np.isfinite(sd) & (sd > 0)))
    return xs, ls, sd, (1.0 / sd**2 if weighted else np.ones(len(used))), weighted


def _laws(used, lc, x_star_BJ, w):
    """(slope_N, intercept_N, slope_D, intercept_D) per row of ln N* [B, J]."""
    d = np.stack([p.tokens_at(x_star_BJ[:, j]) for j, p in enumerate(used)], axis=1)
    return weighted_lines(lc, x_star_BJ, w) + weighted_lines(lc, np.log(d), w)


def approach2(pts, budgets, warn, *, method=DEFAULT_METHOD, n_bootstrap=1000, seed=0, isoflop_budgets=None,
              interpolate="auto", percentiles=DEFAULT_PERCENTILES) -> dict:  # fmt: skip
    """Chinchilla Approach 2: a minimum per IsoFLOP budget, then N_opt ~ C^a and D_opt ~ C^b.

    method: one of METHODS (see the module doc). Budgets whose lowest loss is at the smallest
    or largest size are left out with a warning. The bootstrap perturbs every run's ln loss by
    the estimated seed noise (loss_noise) and refits with the full-data weights.
    """
    if method not in METHODS:
        raise AnalysisError(f"approach 2 method {method!r}; choose from {', '.join(METHODS)}")
    iso, iso_pts, source = _budget_points(pts, isoflop_budgets, interpolate, warn)
    profiles = [make_profile(b, n, d, loss) for b, _, n, d, loss in ap.isoflop_groups(iso_pts)]
    used = []
    for prof in profiles:
        if prof.log_n.size < 3:
            warn(f"approach 2: budget {prof.budget:.4g} FLOPs excluded: {prof.log_n.size} model size(s), need >= 3")
        elif not prof.bracketed:
            k = int(np.argmin(prof.log_loss))
            warn(f"approach 2: budget {prof.budget:.4g} FLOPs excluded: its lowest loss is at its "
                 f"{'smallest' if k == 0 else 'largest'} size (N = {np.exp(prof.log_n[k]):.4g}), so the minimum "
                 "is not bracketed")  # fmt: skip
        elif method == "parabola" and not (prof.log_n[0] <= locate_minimum(prof, prof.log_loss, method)[0] <= prof.log_n[-1]):
            warn(f"approach 2: budget {prof.budget:.4g} FLOPs excluded: its parabola is not convex or its minimum "
                 "lies outside the sampled sizes")  # fmt: skip
        else:
            used.append(prof)
    if len(used) < 2:
        raise AnalysisError(f"approach 2: only {len(used)} usable IsoFLOP budget(s) (bracketed minimum, >= 3 sizes); need >= 2")
    lc = np.log([p.budget for p in used])
    noise = loss_noise(used)
    sigma = noise["sigma"]
    def weights_rng(m):  # one stream per method: a method's a does not depend on which one is reported
        return np.random.default_rng([seed, METHODS.index(m)])

    rng = np.random.default_rng(seed)
    x_star, loss_star, sd, w, weighted = _minima(used, method, sigma, weights_rng(method))
    if method != "parabola" and not weighted:
        warn(f"approach 2: no estimate of the minima's uncertainty ({noise['source']}); N_opt(C) fitted unweighted")
    sn, in_, sd_, id_ = (float(v[0]) for v in _laws(used, lc, x_star[None, :], w))
    n_law, d_law = ap.PowerLaw(float(np.exp(in_)), sn), ap.PowerLaw(float(np.exp(id_)), sd_)
    out = {"a": n_law.exponent, "b": d_law.exponent, "k_N": n_law.k, "k_D": d_law.k,
           "N_opt": n_law(budgets).tolist(), "D_opt": d_law(budgets).tolist(),
           "tokens_per_param": (d_law(budgets) / n_law(budgets)).tolist()}  # fmt: skip
    if n_bootstrap and sigma:
        xb = perturbed_minima(used, method, sigma, n_bootstrap, rng, df=noise["df"])
        bn, bin_, bd, bid = _laws(used, lc, xb, w)
        n_s, d_s = _power_samples(bn, bin_, budgets), _power_samples(bd, bid, budgets)
        samples = {"a": bn, "b": bd, "k_N": np.exp(bin_), "k_D": np.exp(bid)}
        out["intervals"] = intervals(samples, percentiles)
        out["intervals_at_budgets"] = [
            intervals({"N_opt": n_s[:, j], "D_opt": d_s[:, j], "tokens_per_param": d_s[:, j] / n_s[:, j]}, percentiles)
            for j in range(len(budgets))
        ]
        out["bootstrap"] = {k: np.asarray(v, float).tolist() for k, v in samples.items()}
        out["bootstrap"]["n_budgets"] = np.isfinite(xb).sum(axis=1).tolist()
    elif n_bootstrap:
        warn(f"approach 2: no bootstrap intervals: no estimate of the loss noise ({noise['source']})")
    out["method"] = {
        "local": "quadratic in ln N with Gaussian weights centred on each budget's minimum (started at the minimum "
                 "of an Akima interpolant); N_opt(C), D_opt(C) weighted by each minimum's inverse variance",
        "akima": "minimum of an Akima interpolant of loss over ln N per budget; N_opt(C), D_opt(C) weighted by "
                 "each minimum's inverse variance (Porian et al. 2024)",
        "parabola": "parabola in ln N through each whole IsoFLOP profile (Hoffmann et al. 2022)",
    }[method] + (f" ({source}; curves interpolated onto budgets: {interpolate}, "
                 f"{int((iso_pts['kind'] == 'interpolated').sum())} such points)")  # fmt: skip
    out["approach2_method"] = method
    out["compare"] = {}
    for other in METHODS:
        if other == method:
            continue
        xo, _, _, wo, _ = _minima(used, other, sigma, weights_rng(other))
        ok = np.isfinite(xo)
        out["compare"][other] = float(weighted_lines(lc[ok], xo[None, ok], wo[ok])[0][0]) if ok.sum() >= 2 else None
    out["loss_noise"] = noise
    out["bootstrap_method"] = (f"every run's ln loss perturbed by the seed noise sigma = {sigma:.4g} "
                               f"({noise['source']}, {noise['df']} degrees of freedom; each resample draws its noise "
                               "level from that estimate's uncertainty, sigma * sqrt(df / chi2_df)); budgets never "
                               "dropped" if sigma else None)  # fmt: skip
    fit_of = {p.budget: j for j, p in enumerate(used)}
    budgets_out = []
    for prof in profiles:
        j = fit_of.get(prof.budget)
        if j is None:
            budgets_out.append({"flops": prof.budget, "fit": None})
            continue
        fit = {"budget": prof.budget, "method": method, "n_opt": float(np.exp(x_star[j])),
               "tokens_opt": float(prof.tokens_at(x_star[j])), "loss_opt": float(loss_star[j]),
               "n_points": prof.n_runs, "n_sizes": int(prof.log_n.size), "inside": True,
               "log_n_opt_sd": None if not np.isfinite(sd[j]) else float(sd[j])}  # fmt: skip
        if method == "parabola":
            fit["c2"], fit["c1"], fit["c0"] = parabola_coefficients(prof)
        budgets_out.append({"flops": prof.budget, "fit": fit})
    out["budgets"] = budgets_out
    out["points"] = {
        "budget": iso_pts["budget"].tolist(), "n_params": iso_pts["n_params"].tolist(),
        "tokens": iso_pts["tokens"].tolist(), "loss": iso_pts["loss"].tolist(), "kind": iso_pts["kind"].tolist(),
    }  # fmt: skip
    return out
