"""Run every requested fit on prepared points and collect a JSON-ready dict of results."""

from __future__ import annotations

import warnings

import numpy as np
from tqdm.auto import tqdm

from analysis import approaches as ap
from analysis import beyond, isoflop, kaplan, parametric
from analysis.bootstrap import DEFAULT_PERCENTILES, intervals, resample_counts
from analysis.laws import LAWS, fit_law, law_from_name
from analysis.load import AnalysisError, AnalysisWarning
from analysis.prepare import Points

DEFAULT_LAWS = ("kaplan_N", "kaplan_D", "kaplan_C", "kaplan_ND", "kaplan_NS", "saturating_C")
# What each law is fitted on (kaplan_N and kaplan_D: analysis.kaplan.selection says).
LAW_DATA = {"kaplan_C": "the compute frontier (lowest loss per FLOP bucket, as Approach 1)",
            "saturating_C": "the compute frontier (lowest loss per FLOP bucket, as Approach 1)",
            "kaplan_ND": "every run's final loss", "chinchilla": "every run's final loss",
            "kaplan_NS": "every evaluated point of every training curve"}  # fmt: skip


def _warn(messages: list, msg: str) -> None:
    messages.append(msg)
    warnings.warn(msg, AnalysisWarning, stacklevel=3)


def _power_samples(pairs, budgets):
    """Bootstrap (k, exponent) pairs -> N or D at each budget, [n_boot, n_budgets]."""
    k = np.array([f[0] for f in pairs])
    e = np.array([f[1] for f in pairs])
    return k[:, None] * np.asarray(budgets, float)[None, :] ** e[:, None]


def _allocation_summary(n_law, d_law, budgets, boot_nk, boot_dk, percentiles):
    out = {
        "a": n_law.exponent, "b": d_law.exponent, "k_N": n_law.k, "k_D": d_law.k,
        "N_opt": n_law(budgets).tolist(), "D_opt": d_law(budgets).tolist(),
        "tokens_per_param": (d_law(budgets) / n_law(budgets)).tolist(),
    }  # fmt: skip
    if boot_nk:
        n_s, d_s = _power_samples(boot_nk, budgets), _power_samples(boot_dk, budgets)
        samples = {"a": [e for _, e in boot_nk], "b": [e for _, e in boot_dk],
                   "k_N": [k for k, _ in boot_nk], "k_D": [k for k, _ in boot_dk]}  # fmt: skip
        out["intervals"] = intervals(samples, percentiles)
        out["intervals_at_budgets"] = [
            intervals({"N_opt": n_s[:, j], "D_opt": d_s[:, j], "tokens_per_param": d_s[:, j] / n_s[:, j]}, percentiles)
            for j in range(len(budgets))
        ]
        out["bootstrap"] = {k: np.asarray(v, float).tolist() for k, v in samples.items()}
    return out


def _safe_power(x, y):
    try:
        law = ap.fit_power_law(x, y)
        return law.k, law.exponent
    except (AnalysisError, np.linalg.LinAlgError, ValueError):
        return np.nan, np.nan


def frontier_function(pts: Points, *, n_buckets=100, min_runs=2):
    """(env_of, method): env_of(include_R or None) -> envelope DataFrame (flops, run_index, n_params, tokens, loss)."""
    p = pts.points
    n_r, d_r, c_r, l_r = (p[c].to_numpy(float) for c in ("n_params", "tokens", "flops", "loss"))
    if pts.has_curves:
        grid = ap.envelope_grid(pts.curves, flops_col="flops", n_buckets=n_buckets, lo=c_r.min(), hi=c_r.max())
        loss_RK, tok_RK = ap.curve_matrix(pts.curves, p, grid, flops_col="flops")

        def env_of(include=None):
            return ap.envelope_from_matrix(grid, loss_RK, tok_RK, n_r, min_runs=min_runs, include_R=include)

        return env_of, f"lower envelope of training curves over {n_buckets} log-spaced FLOP buckets from the smallest to the largest final compute (>= {min_runs} curves each; buckets won by the smallest or largest model dropped)"

    def env_of(include=None):
        idx = np.arange(len(p)) if include is None else np.flatnonzero(include)
        env = ap.pareto_final_points(c_r[idx], l_r[idx], n_r[idx], d_r[idx])
        env["run_index"] = idx[env["run_index"].to_numpy(int)]
        return env

    return env_of, "no training curves: envelope of final points (runs beating every cheaper run)"


def approach1(pts: Points, budgets, counts_BR, messages, *, percentiles=DEFAULT_PERCENTILES):
    """Chinchilla Approach 1 (envelope of training curves), with bootstrap over runs."""
    p = pts.points
    env_of, method = frontier_function(pts)
    if not pts.has_curves:
        _warn(messages, "approach 1: the data has no training curves; using the envelope of final points")
    env = env_of(None)
    if env["n_params"].nunique() < 2:
        raise AnalysisError(f"approach 1: the envelope holds {env['n_params'].nunique()} distinct model size(s); need >= 2")
    if env["n_params"].nunique() < 3:
        _warn(messages, "approach 1: fewer than 3 model sizes on the envelope; exponents are poorly determined")
    n_law, d_law = ap.fit_power_law(env["flops"], env["n_params"]), ap.fit_power_law(env["flops"], env["tokens"])
    boot_n, boot_d = [], []
    for counts in counts_BR:
        e = env_of(counts > 0)
        boot_n.append(_safe_power(e["flops"], e["n_params"]) if len(e) else (np.nan, np.nan))
        boot_d.append(_safe_power(e["flops"], e["tokens"]) if len(e) else (np.nan, np.nan))
    out = _allocation_summary(n_law, d_law, budgets, boot_n, boot_d, percentiles)
    out["method"] = method
    out["envelope"] = {
        "flops": env["flops"].tolist(), "n_params": env["n_params"].tolist(), "tokens": env["tokens"].tolist(),
        "loss": env["loss"].tolist(), "run": p["run"].to_numpy()[env["run_index"].to_numpy(int)].tolist(),
    }  # fmt: skip
    return out


def approach2(pts: Points, budgets, counts_BR, messages, *, method=isoflop.DEFAULT_METHOD, seed=0, isoflop_budgets=None,
              interpolate="auto", percentiles=DEFAULT_PERCENTILES):  # fmt: skip
    """Chinchilla Approach 2 (IsoFLOP minima; see analysis.isoflop), len(counts_BR) bootstrap resamples."""
    return isoflop.approach2(pts, budgets, lambda msg: _warn(messages, msg), method=method, n_bootstrap=len(counts_BR),
                             seed=seed, isoflop_budgets=isoflop_budgets, interpolate=interpolate,
                             percentiles=percentiles)  # fmt: skip


_approach2 = approach2  # fit_points' argument approach2 (the method) shadows the name


def approach3(pts: Points, budgets, counts_BR, seed, percentiles=DEFAULT_PERCENTILES):
    """Chinchilla Approach 3 (parametric Huber fit, full grid), bootstrap with warm starts."""
    p = pts.points
    n, d, l = p["n_params"].to_numpy(float), p["tokens"].to_numpy(float), p["loss"].to_numpy(float)
    fit = parametric.fit_parametric(n, d, l)
    out = fit.to_dict()
    # Budgets are in the data's FLOP convention; allocate under it, C = k N^c D fitted on the runs
    fpt = parametric.fit_flops_per_token(n, d, p["flops"].to_numpy(float))
    kc = (fpt["k"], fpt["c"])
    out["flops_per_token"] = fpt | {"note": f"C / D = k N^c fitted on the runs ({pts.flops_convention}); "
                                            "N_opt, D_opt at budgets use it; a, b, G are for C = 6 N D"}  # fmt: skip
    n_opt, d_opt = parametric.compute_optimal(fit.params, budgets, kc)
    out.update(N_opt=n_opt.tolist(), D_opt=d_opt.tolist(), tokens_per_param=(d_opt / n_opt).tolist(),
               loss_opt=parametric.predict(fit.params, n_opt, d_opt).tolist())  # fmt: skip
    out["residuals_log"] = (np.log(parametric.predict(fit.params, n, d)) - np.log(l)).tolist()
    n_bootstrap = len(counts_BR)
    if n_bootstrap:
        b = parametric.bootstrap_parametric(n, d, l, fit, n_bootstrap=n_bootstrap, seed=seed, counts_Bn=counts_BR)
        der = parametric.derived(b)
        samples = {k: b[k] for k in parametric.PARAM_NAMES} | {"a": der["a"], "b": der["b"], "G": der["G"]}
        out["intervals"] = intervals(samples, percentiles)
        prm = {q: b[q][:, None] for q in parametric.PARAM_NAMES}
        nb, db = parametric.compute_optimal(prm, np.asarray(budgets)[None, :], kc)
        out["intervals_at_budgets"] = [
            intervals({"N_opt": nb[:, j], "D_opt": db[:, j], "tokens_per_param": db[:, j] / nb[:, j]}, percentiles)
            for j in range(len(budgets))
        ]
        out["bootstrap"] = {k: np.asarray(v, float).tolist() for k, v in samples.items()}
        out["bootstrap_converged_fraction"] = float(np.mean(b["converged"]))
        out["bootstrap_starts"] = "warm: full-data optimum + 2 other local optima + 3 random grid points per resample"
    return out, fit


def _min_by_key(key, x, loss):
    """Per distinct key: the key's x (first seen) and the lowest loss."""
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    best = np.full(uniq.size, np.inf)
    np.minimum.at(best, inv, loss)
    return x[first], best


def _law_data(name: str, pts: Points, frontier_fn=None, selected=None):
    """rows -> (inputs, losses) a law is fitted to (rows: run indices of a bootstrap resample, with
    repeats; None: every run once); selected: kaplan.selection of the law. What does not depend on
    the resample is computed here, once per law."""
    p = pts.points
    n_runs = len(p)
    n_k, d, loss = (p[c].to_numpy(float) for c in ("n_params_kaplan", "tokens", "loss"))

    def resample(rows):
        return np.arange(n_runs) if rows is None else np.asarray(rows)

    if selected is not None:  # kaplan_N, kaplan_D: the frontier runs not limited by the other variable
        use = selected["use"]

        def data(rows=None):
            rows = resample(rows)
            keep = use[rows]
            if selected["variable"] == "N":
                x, y = _min_by_key(n_k[rows][keep], n_k[rows][keep], loss[rows][keep])
                return {"N": x}, y
            dk = d[rows][keep]
            x, y = _min_by_key(np.round(np.log10(dk), 3), dk, loss[rows][keep])
            return {"D": x}, y

        return data
    if name.startswith(("kaplan_C", "saturating_C")):

        def data(rows=None):
            include = np.zeros(n_runs, bool)
            include[resample(rows)] = True
            env = frontier_fn(None if include.all() else include)
            return {"C": env["flops"].to_numpy(float)}, env["loss"].to_numpy(float)

        return data
    if name.startswith(("kaplan_ND", "chinchilla")):
        n = n_k if name.startswith("kaplan") else p["n_params"].to_numpy(float)

        def data(rows=None):
            rows = resample(rows)
            return {"N": n[rows], "D": d[rows]}, loss[rows]

        return data
    if name.startswith("kaplan_NS"):
        c = pts.curves[pts.curves["step"] > 0]
        if c.empty:
            raise AnalysisError("kaplan_NS needs training curves with steps (none in the data)")
        run_idx = c["run"].map({r: i for i, r in enumerate(p["run"])}).to_numpy()
        order = np.argsort(run_idx, kind="stable")
        starts = np.searchsorted(run_idx[order], np.arange(n_runs + 1))
        n_of_row, step, curve_loss = n_k[run_idx], c["step"].to_numpy(float), c["loss"].to_numpy(float)

        def data(rows=None):
            sel = np.concatenate([order[starts[r] : starts[r + 1]] for r in resample(rows)])  # curve rows of each resampled run
            return {"N": n_of_row[sel], "S": step[sel]}, curve_loss[sel]

        return data
    raise AnalysisError(f"unknown law {name!r}; choose from {sorted(LAWS)} (append '+E' for an irreducible term)")


def _cached_frontier(frontier_fn):
    """frontier_fn remembering each include mask's envelope: L(C) laws share their resamples' frontiers."""
    cache = {}

    def env_of(include=None):
        key = None if include is None else include.tobytes()
        if key not in cache:
            cache[key] = frontier_fn(include)
        return cache[key]

    return env_of


def fit_laws(pts: Points, laws, counts_BR, messages, percentiles=DEFAULT_PERCENTILES, progress=False, unsupported=None):
    """Fit each named law; bootstrap warm-started from the full-data optimum. Kaplan's L(N) and L(D)
    are fitted on the runs they are defined on (analysis.kaplan); a law the data cannot support
    goes into ``unsupported`` (name -> reason and candidate points) instead."""
    unsupported = {} if unsupported is None else unsupported
    try:
        frontier_fn = _cached_frontier(frontier_function(pts)[0])
    except AnalysisError as err:
        frontier_error = err

        def frontier_fn(include=None):
            raise AnalysisError(f"no compute frontier: {frontier_error}")

    out = {}
    for name in laws:
        law = law_from_name(name)
        sel = kaplan.selection(name, pts)
        if sel is not None and sel["n_supported"] < len(law.param_names) + 1:
            reason = kaplan.unsupported_reason(name, sel, len(law.param_names) + 1)
            _warn(messages, f"law {name} not fitted: {reason}")
            unsupported[name] = {"law": law.name, "formula": law.formula, "citation": law.citation, "reason": reason,
                                 "data": {sel["variable"]: sel["evidence"]["value"], "loss": sel["evidence"]["loss"]}}  # fmt: skip
            continue
        try:
            data = _law_data(name, pts, frontier_fn=frontier_fn, selected=sel)
            x, y = data()
            fitted = fit_law(law, y, **x)
        except AnalysisError as err:
            _warn(messages, f"law {name} skipped: {err}")
            continue
        res = fitted.to_dict()
        res["fitted_on"] = sel["fitted_on"] if sel else LAW_DATA.get(name.partition("+")[0], "all runs")
        res["data"] = {k: v.tolist() for k, v in x.items()} | {"loss": y.tolist()}
        samples = {k: [] for k in law.param_names}
        for counts in tqdm(counts_BR, desc=f"bootstrap {name}", disable=not progress, leave=False):
            try:
                xb, yb = data(np.repeat(np.arange(len(pts.points)), counts))
                pb = fit_law(law, yb, theta0=fitted.theta, **xb).params
            except (AnalysisError, ValueError):
                pb = {k: np.nan for k in law.param_names}
            for k in law.param_names:
                samples[k].append(pb[k])
        if counts_BR is not None and len(counts_BR):
            res["intervals"] = intervals(samples, percentiles)
        out[name] = res
    return out


def fit_laws_quietly(pts: Points, laws, counts_BR, percentiles=DEFAULT_PERCENTILES):
    """fit_laws in another process: returns (laws, laws_unsupported, warning messages) for the
    caller to report, since warnings raised there would not reach the caller's handlers."""
    messages, unsupported = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        out = fit_laws(pts, laws, counts_BR, messages, percentiles, unsupported=unsupported)
    return out, unsupported, messages


def extrapolation_check(pts: Points, holdout_flops=None):
    """Fit Approach 3 on runs below a compute threshold; report loss errors on the held-out runs."""
    p = pts.points
    c = p["flops"].to_numpy(float)
    if holdout_flops is None:
        budgets, _ = ap.auto_budgets(c)
        if budgets.size >= 3:
            holdout_flops = float(np.sqrt(budgets[-1] * budgets[-2]))
        else:
            holdout_flops = float(np.percentile(c, 75))
    train = c < holdout_flops
    if train.sum() < 6 or (~train).sum() < 1:
        return {"skipped": f"threshold {holdout_flops:.3g} leaves {train.sum()} fit / {(~train).sum()} held-out runs"}
    q = p[train]
    try:
        fit = parametric.fit_parametric(q["n_params"], q["tokens"], q["loss"])
    except AnalysisError as err:  # e.g. too few distinct (N, D) below the threshold
        return {"skipped": f"threshold {holdout_flops:.3g}: {err}"}
    held = p[~train]
    pred = parametric.predict(fit.params, held["n_params"], held["tokens"])
    rel = pred / held["loss"].to_numpy(float) - 1.0
    return {
        "threshold_flops": holdout_flops, "n_fit": int(train.sum()), "n_heldout": int((~train).sum()),
        "fit_params": fit.params, "heldout_runs": held["run"].tolist(), "predicted_loss": pred.tolist(),
        "observed_loss": held["loss"].tolist(), "relative_error": rel.tolist(),
        "mean_abs_relative_error": float(np.mean(np.abs(rel))), "max_abs_relative_error": float(np.max(np.abs(rel))),
    }  # fmt: skip


def default_budgets(flops) -> np.ndarray:
    """Decades from the smallest run's compute up to 1,000x the largest (the table's rows)."""
    lo, hi = np.floor(np.log10(np.min(flops))), np.ceil(np.log10(np.max(flops))) + 3
    return 10.0 ** np.arange(lo, hi + 1)


def fit_points(pts: Points, *, approaches=("1", "2", "3"), laws=DEFAULT_LAWS, budgets=None, isoflop_budgets=None,
               interpolate="auto", n_bootstrap=1000, seed=0, percentiles=DEFAULT_PERCENTILES, holdout_flops=None,
               extrapolation=True, progress=True, approach2=isoflop.DEFAULT_METHOD, helper=None) -> dict:  # fmt: skip
    """All requested fits on prepared points; returns the fits dict written to fits.json.

    helper: an analysis.helper.Helper (helper_process) that fits the laws while this process fits
    the approaches; the results are the same as without one.
    """
    messages = list(pts.messages)
    approaches = tuple(str(a) for a in approaches)
    bad = [a for a in approaches if a not in ("1", "2", "3")]
    if bad:
        raise AnalysisError(f"unknown approach(es) {bad}; choose from 1, 2, 3")
    beyond_laws = tuple(n for n in laws if n in beyond.NAMES)  # fitted by their own modules
    laws = tuple(n for n in laws if n not in beyond.NAMES)
    for name in laws:
        law_from_name(name)  # unknown names fail before any fitting
    for name in beyond_laws:
        beyond.check_columns(name, pts.points)  # so do missing columns
    if approach2 not in isoflop.METHODS:
        raise AnalysisError(f"approach2={approach2!r} (--approach2); choose from {', '.join(isoflop.METHODS)}")
    if interpolate not in ("auto", "always", "never"):
        raise AnalysisError(f"interpolate={interpolate!r}; expected auto, always or never")
    for name, value in (("n_bootstrap (--bootstrap)", n_bootstrap), ("seed (--seed)", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise AnalysisError(f"{name} must be an integer >= 0, got {value!r}")
    if holdout_flops is not None and not (np.isfinite(holdout_flops) and holdout_flops > 0):
        raise AnalysisError(f"holdout_flops (--holdout-flops) must be a finite FLOP count > 0, got {holdout_flops!r}")
    budgets = default_budgets(pts.points["flops"]) if budgets is None else np.asarray(budgets, float)
    if budgets.ndim != 1 or budgets.size == 0 or not np.all(np.isfinite(budgets) & (budgets > 0)):
        raise AnalysisError(f"budgets must be positive FLOP values, got {budgets.tolist()}")
    rng = np.random.default_rng(seed)
    counts_BR = resample_counts(len(pts.points), n_bootstrap, rng) if n_bootstrap else np.zeros((0, len(pts.points)), int)
    stages = [f"approach {a}" for a in approaches] + (["laws"] if laws else []) + (["extrapolation"] if extrapolation else [])
    out = {
        "flops_convention": pts.flops_convention, "n_params_column": pts.n_params_column,
        "kaplan_n_column": pts.kaplan_n_column, "loss_column": pts.loss_column, "n_runs": int(len(pts.points)),
        "runs": pts.points["run"].tolist(), "budgets": budgets.tolist(), "n_bootstrap": int(n_bootstrap),
        "seed": int(seed), "percentiles": list(percentiles), "approaches": {}, "laws": {},
    }  # fmt: skip
    laws_elsewhere = helper.submit(fit_laws_quietly, pts, laws, counts_BR, percentiles) if helper and laws else None
    with tqdm(total=len(stages), desc="fitting", disable=not progress) as bar:
        for a in approaches:
            bar.set_postfix_str(f"approach {a}")
            try:
                if a == "1":
                    out["approaches"]["1"] = approach1(pts, budgets, counts_BR, messages, percentiles=percentiles)
                elif a == "2":
                    out["approaches"]["2"] = _approach2(pts, budgets, counts_BR, messages, method=approach2, seed=seed + 2,
                                                        isoflop_budgets=isoflop_budgets, interpolate=interpolate,
                                                        percentiles=percentiles)  # fmt: skip
                else:
                    out["approaches"]["3"], _ = approach3(pts, budgets, counts_BR, seed + 1, percentiles)
            except AnalysisError as err:
                if len(approaches) == 1:
                    raise
                _warn(messages, f"approach {a} failed: {err}")
            bar.update()
        held_out = None
        if extrapolation and laws_elsewhere is not None:  # now, while the helper is still fitting the laws
            bar.set_postfix_str("extrapolation")
            held_out = extrapolation_check(pts, holdout_flops)
        if laws:
            bar.set_postfix_str("laws")
            if laws_elsewhere is None:
                out["laws_unsupported"] = {}
                out["laws"] = fit_laws(pts, laws, counts_BR, messages, percentiles, progress, out["laws_unsupported"])
            else:  # its warnings now, in the order a fit in this process would give them
                out["laws"], out["laws_unsupported"], law_messages = laws_elsewhere.result()
                for msg in law_messages:
                    _warn(messages, msg)
            bar.update()
        if beyond_laws:
            out["beyond"] = beyond.fit_all(pts.points, beyond_laws, counts_BR, percentiles)
        if extrapolation:
            bar.set_postfix_str("extrapolation")
            out["extrapolation"] = extrapolation_check(pts, holdout_flops) if held_out is None else held_out
            bar.update()
    out["warnings"] = messages
    if not out["approaches"] and not out["laws"] and not out.get("beyond"):
        raise AnalysisError("nothing could be fitted to these runs: " + "; ".join(messages))
    return out
