"""Laws beyond Chinchilla, fitted on request (``--law NAME``): each in its own module.

    data_constrained   repeated data, Muennighoff et al. 2023      (analysis.data_constrained)
    overtraining       loss against compute and tokens per parameter, Gadre et al. 2024
                                                                   (analysis.overtraining)
    lr_scaling         eta_opt(C), B_opt(C), DeepSeek-AI 2024      (analysis.lr_scaling)

Each module has ``COLUMNS`` (point columns it needs besides N, D, C and loss),
``fit_points(points, counts_BR, percentiles) -> dict``, ``report_lines(result) -> list[str]``
and ``draw(result, out_dir) -> list[str]``. Their results go to ``fits["beyond"][name]``
in fits.json; report.md gets one section and one figure per law.
"""

from __future__ import annotations

import importlib

import numpy as np

from analysis.bootstrap import intervals
from analysis.load import AnalysisError

MODULES = {"data_constrained": "analysis.data_constrained", "overtraining": "analysis.overtraining",
           "lr_scaling": "analysis.lr_scaling"}  # fmt: skip
NAMES = tuple(MODULES)


def module(name: str):
    """The module of the law ``name`` (one of NAMES)."""
    return importlib.import_module(MODULES[name])


def check_columns(name: str, points) -> None:
    """AnalysisError naming the columns (or the runs lacking values in them) the law ``name`` needs."""
    need = module(name).COLUMNS
    missing = [c for c in need if c not in points or points[c].isna().all()]
    if missing:
        raise AnalysisError(
            f"law {name} needs the column(s) {', '.join(missing)} besides n_params_total (N), tokens and loss; "
            f"the data has none (in a table add the column; in a sweep set them in the run configs)"
        )
    for c in need:
        vals = points[c].to_numpy(float)
        bad = ~(np.isfinite(vals) & (vals > 0))
        if bad.any():
            runs = points.loc[bad, "run"].astype(str).tolist()
            raise AnalysisError(f"law {name}: {c} must be finite and > 0 in every run; bad in {len(runs)}: {runs[:10]} "
                                "(leave them out with --exclude RUN ...)")  # fmt: skip


def fit_all(points, names, counts_BR, percentiles) -> dict:
    """{name: result} for each requested law; errors propagate (the user asked for these laws)."""
    out = {}
    for name in names:
        check_columns(name, points)
        out[name] = module(name).fit_points(points, counts_BR, percentiles)
    return out


def bootstrap_law(fitted, inputs: dict, loss, counts_BR, percentiles) -> dict:
    """Percentile intervals of a FittedLaw's parameters over resamples of the points (warm-started refits).

    counts_BR: [n_bootstrap, n] multiplicities of each point; empty: no intervals ({}).
    """
    if counts_BR is None or len(counts_BR) == 0:
        return {}
    law = fitted.law
    samples = {k: [] for k in law.param_names}
    for counts in counts_BR:
        rows = np.repeat(np.arange(len(loss)), counts)
        try:
            p = law.fit(np.asarray(loss)[rows], theta0=fitted.theta, **{k: np.asarray(v)[rows] for k, v in inputs.items()}).params
        except (AnalysisError, ValueError):  # a resample with too few distinct values
            p = {k: np.nan for k in law.param_names}
        for k in law.param_names:
            samples[k].append(p[k])
    return {"intervals": intervals(samples, percentiles)}


def report_lines(fits: dict) -> list[str]:
    """The report.md sections of the laws in fits["beyond"]."""
    lines = []
    for name, res in (fits.get("beyond") or {}).items():
        lines += module(name).report_lines(res)
    return lines


def draw_all(fits: dict, out_dir) -> list[str]:
    """The figure of each law in fits["beyond"] (PNG + PDF paths)."""
    paths = []
    for name, res in (fits.get("beyond") or {}).items():
        paths += module(name).draw(res, out_dir)
    return paths


def write_files(fits: dict, out_dir) -> dict:
    """Files a law writes besides fits.json (lr_scaling: lr_rule.yaml); returns {key: path}."""
    paths = {}
    for name, res in (fits.get("beyond") or {}).items():
        writer = getattr(module(name), "write_files", None)
        if writer is not None:
            paths.update(writer(res, out_dir, fits.get("flops_convention", "")))
    return paths
