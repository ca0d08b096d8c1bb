"""Where does an ability appear? The emergence table (smallest scale above the random baseline)
and the loss threshold of Du et al. 2024, both from the tidy table of analysis.emergence_load.

Emergence rule (stated in every report, see ``rule_text``): a model size counts as above the
baseline when the mean of its seeds' metric exceeds ``baseline + margin`` (``margin`` in the
metric's own units, default 0.1 absolute; for lower-is-better metrics: falls below
``baseline - margin``). The emergence scale is the smallest size that is above and after which
every larger size is above too; sizes are ordered by N for the N column and by training FLOPs
for the C column. Only each run's final evaluation counts.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.emergence_metrics import SOLVE_THRESHOLD, higher_is_better, seed_summary

MARGIN = 0.1


def rule_text(margin: float = MARGIN, solve_threshold: float = SOLVE_THRESHOLD) -> str:
    """The emergence and "solved" rules, in words, as the report states them."""
    return (
        f"A model size is above the random baseline when the mean over its seeds exceeds baseline + {margin:g} "
        f"(in the metric's units; for lower-is-better metrics such as edit distance and Brier score: falls below "
        f"baseline - {margin:g}). The emergence scale is the smallest size that is above and after which every "
        "larger size stays above (sizes ordered by N, and separately by training FLOPs C); only final "
        f"evaluations count. A seed solves a task when its exact match is >= {solve_threshold:g}."
    )


def emergence_scale(x, value, baseline: float, margin: float = MARGIN, higher: bool = True) -> dict:
    """Smallest x at which ``value`` is above ``baseline`` by ``margin`` and stays above at every larger x.

    x, value: one entry per scale (any order; sorted here). Returns status ("emerges": below at
    the smallest scale, "above at every scale", "not above": the largest scale is not above,
    "no baseline"), at (the emergence x, or None), last_below (the largest x below it), first_above
    (the smallest x ever above: earlier than ``at`` when the curve is not monotone), threshold.
    """
    x, v = np.asarray(x, float), np.asarray(value, float)
    order = np.argsort(x, kind="stable")
    x, v = x[order], v[order]
    out = {"status": "no baseline", "at": None, "last_below": None, "first_above": None, "threshold": None,
           "n_scales": int(x.size)}  # fmt: skip
    if baseline is None or not math.isfinite(baseline) or x.size == 0:
        return out
    threshold = baseline + margin if higher else baseline - margin
    above = v > threshold if higher else v < threshold
    out["threshold"] = float(threshold)
    if above.any():
        out["first_above"] = float(x[np.argmax(above)])
    if not above[-1]:
        out["status"] = "not above"
        return out
    below = np.flatnonzero(~above)
    i = int(below[-1]) + 1 if below.size else 0
    out["at"] = float(x[i])
    out["last_below"] = float(x[i - 1]) if i > 0 else None
    out["status"] = "emerges" if i > 0 else "above at every scale"
    return out


def emergence_table(table: pd.DataFrame, margin: float = MARGIN, solve_threshold: float = SOLVE_THRESHOLD) -> list[dict]:
    """One entry per (source, task, metric) with a baseline: the emergence scale by N and by C.

    Each entry: source, task, metric, baseline, higher_is_better, margin, n_params ({status, at,
    last_below, first_above, threshold, n_scales}), flops (the same over FLOPs), and values:
    the per-size seed means in order of N.
    """
    final = table[table["final"].astype(bool)]
    summary = seed_summary(final, solve_threshold)
    rows = []
    for (source, task, metric), g in summary.groupby(["source", "task", "metric"], sort=True):
        base = g["baseline"].dropna()
        if base.empty:
            continue
        b, hib = float(base.mean()), higher_is_better(metric)
        g = g.sort_values("n_params")
        rows.append({
            "source": source, "task": task, "metric": metric, "baseline": b, "higher_is_better": hib, "margin": margin,
            "n_params": emergence_scale(g["n_params"], g["mean"], b, margin, hib),
            "flops": emergence_scale(g["flops"], g["mean"], b, margin, hib),
            "values": [{"model": m, "n_params": n, "flops": c, "mean": v, "n_seeds": int(k), "frac_solved": f}
                       for m, n, c, v, k, f in g[["model", "n_params", "flops", "mean", "n_seeds", "frac_solved"]].itertuples(index=False)],
        })  # fmt: skip
    return rows


def ramp(loss, threshold: float, saturation: float, level: float, rise: float):
    """The fitted curve: ``level`` for loss >= threshold, ``level + rise`` for loss <= saturation, linear between."""
    loss = np.asarray(loss, float)
    return level + rise * np.clip((threshold - loss) / (threshold - saturation), 0.0, 1.0)


def fit_loss_threshold(loss, value, higher: bool = True, n_grid: int = 60) -> dict:
    """Ramp fit in eval loss L (Du et al. 2024): flat at ``level`` above the loss threshold eta,
    then linear in L, then flat again at ``level + rise`` below a saturation loss (so that a
    metric that tops out at 1 does not drag the threshold; with no saturation in the data the
    saturation loss is the lowest loss seen and the fit is a hinge).

    eta and the saturation loss (nats/token) are searched on a grid over the observed loss
    range, level and rise by least squares; rise > 0 for higher-is-better metrics, < 0 otherwise.
    Returns threshold, saturation, level, rise, rss, rss_constant (flat fit), r2, n_points;
    threshold None when fewer than 4 points or no ramp beats the flat fit.
    """
    loss, value = np.asarray(loss, float), np.asarray(value, float)
    ok = np.isfinite(loss) & np.isfinite(value)
    loss, value = loss[ok], value[ok]
    out = {"threshold": None, "saturation": None, "level": None, "rise": None, "rss": None, "rss_constant": None,
           "r2": None, "n_points": int(loss.size)}  # fmt: skip
    if loss.size < 4 or np.ptp(loss) <= 0:
        return out
    rss0 = float(np.sum((value - value.mean()) ** 2))
    out.update(level=float(value.mean()), rise=0.0, rss=rss0, rss_constant=rss0)
    grid = np.linspace(loss.min(), loss.max(), n_grid)
    best = None
    for i, eta in enumerate(grid[1:], 1):
        for sat in grid[:i]:
            h = np.clip((eta - loss) / (eta - sat), 0.0, 1.0)
            if np.count_nonzero(h) < 2:  # the rise needs two points, else it fits one outlier
                continue
            a = np.column_stack([np.ones_like(h), h])
            (b, r), *_ = np.linalg.lstsq(a, value, rcond=None)
            if (r <= 0) if higher else (r >= 0):
                continue
            rss = float(np.sum((a @ np.array([b, r]) - value) ** 2))
            if best is None or rss < best[0] - 1e-12:
                best = (rss, float(eta), float(sat), float(b), float(r))
    if best is not None and best[0] < rss0:
        rss, eta, sat, b, r = best
        out.update(threshold=eta, saturation=sat, level=b, rise=r, rss=rss, r2=1.0 - rss / rss0 if rss0 > 0 else None)
    return out


def loss_thresholds(table: pd.DataFrame, metrics=None) -> list[dict]:
    """fit_loss_threshold per (source, task, metric) over every run and evaluated step with an eval loss."""
    rows = []
    t = table[np.isfinite(table["eval_loss"].to_numpy(float))]
    if metrics is not None:
        t = t[t["metric"].isin(list(metrics))]
    for (source, task, metric), g in t.groupby(["source", "task", "metric"], sort=True):
        fit = fit_loss_threshold(g["eval_loss"], g["value"], higher_is_better(metric))
        rows.append({"source": source, "task": task, "metric": metric} | fit)
    return rows
