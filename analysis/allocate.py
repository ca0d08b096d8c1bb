"""Choose N and D from a fitted or published law: compute budgets, target loss with inference, unique-data limits.

Three questions, one table (``chinchax allocate``):

* compute-optimal: N, D minimising L(N, D) at training compute C = 6 N D (Hoffmann et al. 2022);
* inference-aware: N, D reaching a target loss L with the least total compute
  6 N D + 2 N T for T expected inference tokens (Sardana et al. 2023, "Beyond
  Chinchilla-Optimal"); compute saved is against the compute-optimal model of the same loss
  served for the same T;
* data-limited: with U_D unique tokens, N, D minimising the data-constrained law
  (Muennighoff et al. 2023) at C; compute saved is against Chinchilla's allocation (blind to
  the limit) reaching the same loss under the same law.

All optimisation is over log N (D follows from C or from the target loss), so one code path
serves every law: ``loss_fn(N, D)`` in nats per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from analysis import data_constrained, parametric, references
from analysis.load import AnalysisError, read_json

PUBLISHED = {
    "hoffmann2022": ("chinchilla", references.CHINCHILLA_APPROACH3, "Hoffmann et al. 2022, Approach 3"),
    "besiroglu2024": ("chinchilla", references.EPOCH_APPROACH3, "Besiroglu et al. 2024, refit of Approach 3"),
    "muennighoff2023": ("data_constrained", references.MUENNIGHOFF2023, "Muennighoff et al. 2023, data-constrained law"),
}
LOG_N_RANGE = (np.log(1e2), np.log(1e16))  # parameters searched


def load_law(law: str) -> tuple[str, dict, str]:
    """(kind, params, description) of a published law name or a fits.json (kind: chinchilla | data_constrained).

    From a fits.json: the data-constrained law if fitted, else Approach 3, else the over-training
    law rewritten as Chinchilla's (C = 6 N D: A = a 6^-eta, B = b 6^-eta, alpha = beta = 2 eta).
    """
    if law in PUBLISHED:
        return PUBLISHED[law]
    path = Path(law)
    if not path.exists():
        raise AnalysisError(f"LAW {law!r} is neither a fits.json nor a published law ({', '.join(PUBLISHED)})")
    if path.is_dir():
        path = path / "fits.json"
    fits = read_json(path)
    beyond = fits.get("beyond") or {}
    if "data_constrained" in beyond:
        return "data_constrained", beyond["data_constrained"]["params"], f"{path}: data-constrained law"
    a3 = (fits.get("approaches") or {}).get("3")
    if a3:
        return "chinchilla", a3["params"], f"{path}: Approach 3"
    if "overtraining" in beyond:
        p = beyond["overtraining"]["params"]
        k = 6.0 ** -p["eta"]
        params = {"E": p["E"], "A": p["a"] * k, "B": p["b"] * k, "alpha": 2 * p["eta"], "beta": 2 * p["eta"]}
        return "chinchilla", params, f"{path}: over-training law as L(N, D)"
    raise AnalysisError(f"{path} holds no law to allocate with (needs Approach 3, data_constrained or overtraining)")


def loss_function(kind: str, params: dict, unique_tokens=None):
    """loss_fn(N, D) of the law; with unique_tokens the data-constrained law (which ``kind`` must be)."""
    if unique_tokens is not None:
        if kind != "data_constrained":
            raise AnalysisError("--unique-tokens needs a data-constrained law (muennighoff2023, or a fits.json "
                                "fitted with --law data_constrained)")  # fmt: skip
        return lambda n, d: data_constrained.predict(params, n, d, unique_tokens)
    return lambda n, d: parametric.predict(params, n, d)


def _argmin_log_n(f, lo=LOG_N_RANGE[0], hi=LOG_N_RANGE[1]) -> float:
    """log N minimising f(log N): a grid, then bounded Brent around the best grid point."""
    grid = np.linspace(lo, hi, 241)
    with np.errstate(all="ignore"):
        vals = np.array([f(x) for x in grid])
    vals = np.where(np.isfinite(vals), vals, np.inf)
    i = int(np.argmin(vals))
    res = minimize_scalar(f, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]), method="bounded",
                          options={"xatol": 1e-10})  # fmt: skip
    return float(res.x) if res.fun <= vals[i] else float(grid[i])


def compute_optimal(loss_fn, flops) -> tuple[float, float]:
    """(N, D) minimising loss_fn(N, D) subject to 6 N D = flops."""
    log_n = _argmin_log_n(lambda x: loss_fn(np.exp(x), flops / (6.0 * np.exp(x))))
    n = float(np.exp(log_n))
    return n, flops / (6.0 * n)


def floor_loss(loss_fn) -> float:
    """The lowest loss the law reaches with unlimited N and D (E, or more when data is limited)."""
    return float(loss_fn(1e30, 1e30))


def tokens_for_loss(loss_fn, n, target) -> float:
    """D at which a model of N parameters reaches ``target`` loss; inf when it never does."""
    lo, hi = np.log(1.0), np.log(1e30)
    if loss_fn(n, np.exp(hi)) >= target:
        return np.inf
    if loss_fn(n, np.exp(lo)) <= target:
        return 1.0
    return float(np.exp(brentq(lambda x: loss_fn(n, np.exp(x)) - target, lo, hi, xtol=1e-12)))


def for_target_loss(loss_fn, target, inference_tokens=0.0) -> tuple[float, float]:
    """(N, D) reaching ``target`` loss with the least 6 N D + 2 N T (T = inference_tokens)."""
    bound = floor_loss(loss_fn)
    if not target > bound:
        raise AnalysisError(f"target loss {target:g} is not above the lowest loss this law reaches, {bound:.4g} "
                            "(E, raised by the unique-data limit if given): no N, D reach it")  # fmt: skip

    def cost(x):
        n = np.exp(x)
        d = tokens_for_loss(loss_fn, n, target)
        return np.log(6.0 * n * d + 2.0 * n * inference_tokens) if np.isfinite(d) else np.inf

    n = float(np.exp(_argmin_log_n(cost)))
    return n, tokens_for_loss(loss_fn, n, target)


def _row(kind, n, d, loss, inference_tokens=None, saved=0.0) -> dict:
    row = {"kind": kind, "flops": 6.0 * n * d, "n_params": n, "tokens": d, "tokens_per_param": d / n, "loss": float(loss)}
    if inference_tokens is not None:
        row["inference_tokens"] = float(inference_tokens)
        row["total_flops"] = 6.0 * n * d + 2.0 * n * inference_tokens
    row["compute_saved"] = float(saved)
    return row


def _naive_flops_for_loss(chinchilla_fn, loss_fn, target, flops) -> float:
    """Compute Chinchilla's allocation (blind to the data limit) needs to reach ``target`` under loss_fn."""

    def gap(x):
        n, d = compute_optimal(chinchilla_fn, np.exp(x))
        return loss_fn(n, d) - target

    lo, hi = np.log(flops) - 1e-9, np.log(flops) + 30 * np.log(10)
    if gap(hi) > 0:
        return np.inf
    return float(np.exp(brentq(gap, lo, hi, xtol=1e-10))) if gap(lo) > 0 else float(flops)


def allocate(law: str, budgets=(), losses=(), inference_tokens=None, unique_tokens=None) -> tuple[list[dict], str]:
    """Rows (dicts: kind, flops, n_params, tokens, tokens_per_param, loss, [inference_tokens, total_flops],
    compute_saved) for each budget (FLOPs) and each target loss (nats/token); and the law's description.

    flops is training compute 6 N D. compute_saved is the fraction of compute saved against the
    compute-optimal choice (see the module docstring); 0 for compute-optimal rows.
    """
    kind, params, described = load_law(law)
    for name, values in (("budgets", budgets), ("losses", losses)):
        if any(not (np.isfinite(v) and v > 0) for v in values):
            raise AnalysisError(f"{name} must be finite and > 0, got {list(values)}")
    if inference_tokens is not None and not losses:
        raise AnalysisError("--inference-tokens needs a target --loss (the model must reach a loss to be served)")
    if inference_tokens is not None and not (np.isfinite(inference_tokens) and inference_tokens >= 0):
        raise AnalysisError(f"inference tokens must be finite and >= 0, got {inference_tokens}")
    if unique_tokens is not None and not (np.isfinite(unique_tokens) and unique_tokens > 0):
        raise AnalysisError(f"unique tokens must be finite and > 0, got {unique_tokens}")
    loss_fn = loss_function(kind, params, unique_tokens)
    chinchilla_fn = loss_function("chinchilla", params)
    rows = []
    for c in budgets:
        n, d = compute_optimal(loss_fn, float(c))
        saved = 0.0
        if unique_tokens is not None:
            c_naive = _naive_flops_for_loss(chinchilla_fn, loss_fn, loss_fn(n, d), float(c))
            saved = 1.0 - float(c) / c_naive
        rows.append(_row("data-limited" if unique_tokens is not None else "compute-optimal", n, d, loss_fn(n, d), saved=saved))
    t = 0.0 if inference_tokens is None else float(inference_tokens)
    for target in losses:
        n, d = for_target_loss(loss_fn, float(target), t)
        n0, d0 = for_target_loss(loss_fn, float(target), 0.0)  # the compute-optimal model of this loss
        total, total0 = 6 * n * d + 2 * n * t, 6 * n0 * d0 + 2 * n0 * t
        rows.append(_row("target loss", n, d, float(target), inference_tokens, saved=1.0 - total / total0))
    return rows, described + (f", {unique_tokens:.3g} unique tokens" if unique_tokens is not None else "")


def format_table(rows: list[dict], described: str) -> str:
    """The rows as an aligned text table with a header line naming the law."""
    head = ["kind", "C (6ND)", "N", "D", "D/N", "loss", "inference T", "total C", "saved"]
    lines = [[r["kind"], f"{r['flops']:.3g}", f"{r['n_params']:.3g}", f"{r['tokens']:.3g}", f"{r['tokens_per_param']:.1f}",
              f"{r['loss']:.4f}", f"{r['inference_tokens']:.3g}" if "inference_tokens" in r else "",
              f"{r['total_flops']:.3g}" if "total_flops" in r else "", f"{100 * r['compute_saved']:.1f}%"]
             for r in rows]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([f"law: {described}", fmt_line(head)] + [fmt_line(r) for r in lines])
