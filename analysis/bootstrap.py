"""Bootstrap helpers: resampling runs and percentile intervals."""

from __future__ import annotations

import numpy as np

# Hoffmann et al. 2022, Table 2 reports 10th and 90th percentiles of bootstrap estimates.
DEFAULT_PERCENTILES = (10.0, 90.0)


def resample_counts(n_runs: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """[n_bootstrap, n_runs] multiplicities of each run in each resample (sum n_runs per row)."""
    return rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_bootstrap)


def interval(samples, percentiles=DEFAULT_PERCENTILES) -> dict:
    """Percentile interval of finite bootstrap samples; NaNs (failed refits) are counted, not used."""
    s = np.asarray(samples, float).ravel()
    ok = np.isfinite(s)
    if not ok.any():
        return {"low": None, "high": None, "median": None, "n": 0, "n_failed": int(s.size)}
    lo, med, hi = np.percentile(s[ok], [percentiles[0], 50.0, percentiles[1]])
    return {"low": float(lo), "high": float(hi), "median": float(med), "n": int(ok.sum()), "n_failed": int((~ok).sum())}


def intervals(samples: dict, percentiles=DEFAULT_PERCENTILES) -> dict:
    """interval() for every entry of a dict of sample arrays."""
    return {k: interval(v, percentiles) for k, v in samples.items()}
