"""One-call entry points: fit_path (fits, table, figures, report) and plot_path (figures only)."""

from __future__ import annotations

from pathlib import Path

from analysis import beyond, figures
from analysis.bootstrap import DEFAULT_PERCENTILES
from analysis.helper import helper_process
from analysis.isoflop import DEFAULT_METHOD
from analysis.load import AnalysisError, load_runs, read_json
from analysis.pipeline import DEFAULT_LAWS, fit_points
from analysis.prepare import prepare
from analysis.report import write_outputs
from rundir import not_a_folder

# What plot_path needs from a fits.json to redraw the figures.
FITS_KEYS = ("flops_convention", "n_params_column", "loss_column", "budgets")


def default_out_dir(path) -> Path:
    """The sweep (or run) directory itself; ``<table stem>_fits/`` next to a table file."""
    path = Path(path)
    return path.with_name(f"{path.stem}_fits") if path.is_file() else path


def fit_path(
    path, out_dir=None, *, approaches=("1", "2", "3"), laws=DEFAULT_LAWS, budgets=None, isoflop_budgets=None,
    interpolate="auto", flops="auto", n_params="n_params_total", loss="final_eval_loss", exclude=(), n_bootstrap=1000,
    seed=0, percentiles=DEFAULT_PERCENTILES, holdout_flops=None, extrapolation=True, figures_=True, progress=True,
    include_stale=False, approach2=DEFAULT_METHOD, parallel=True,
) -> dict:  # fmt: skip
    """Fit Chinchilla approaches and Kaplan laws to a sweep/run directory or a CSV/Parquet table.

    Writes fits.json, compute_optimal.md/.csv (N_opt, D_opt, tokens per parameter at
    ``budgets`` FLOPs), figures (PNG + PDF) and report.md into ``out_dir`` (default:
    ``default_out_dir(path)``). Returns the fits dict (as in fits.json, NaN kept as float).

    approaches: subset of "1", "2", "3". laws: names from analysis.laws.LAWS, "+E" adds an
    irreducible term (e.g. "kaplan_N+E"), or analysis.beyond.NAMES (data_constrained, overtraining,
    lr_scaling: results under fits["beyond"]; lr_scaling also writes lr_rule.yaml). budgets: compute budgets (FLOPs) for the table,
    default decades from the smallest run to 1,000x the largest. isoflop_budgets: Approach-2
    budgets, default: runs grouped by final FLOPs. interpolate: Approach-2 use of training curves
    interpolated onto a budget: "auto" (only where < 3 runs end at it), "always", "never".
    approach2: how Approach 2 locates each budget's minimum: "local" (default: quadratic with
    Gaussian weights centred on the minimum), "akima" (minimum of an Akima interpolant, Porian et
    al. 2024) or "parabola" (whole-profile parabola, Hoffmann et al. 2022); see analysis.isoflop.
    flops: "auto", "6N", "6N+attention" or "6ND" (derive C = 6 N D). n_params: the N column. loss: final_eval_loss or best_eval_loss.
    exclude: run names to leave out. n_bootstrap: resamples of runs (0: none).
    holdout_flops: compute threshold of the extrapolation check (default: largest budget held out).
    include_stale: in a sweep directory, also fit run folders its index.json does not list (by
    default they are left out with a warning: they belong to an earlier version of the spec).
    parallel: fit the laws and draw half the figures in a second process (analysis.helper) when
    there are two cores; the results are the same either way.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(path)
    problem = not_a_folder(out_dir)
    if problem:  # found now, not after minutes of fitting
        raise AnalysisError(f"cannot write the fits to {out_dir}: {problem}")
    runs, curves = load_runs(path, include_stale=include_stale)
    pts = prepare(runs, curves, flops=flops, n_params=n_params, loss=loss, exclude=exclude)
    with helper_process(parallel and (figures_ or bool(laws))) as helper:
        fits = fit_points(
            pts, approaches=approaches, laws=tuple(laws or ()), budgets=budgets, isoflop_budgets=isoflop_budgets,
            interpolate=interpolate, n_bootstrap=n_bootstrap, seed=seed, percentiles=percentiles,
            holdout_flops=holdout_flops, extrapolation=extrapolation, progress=progress, approach2=approach2,
            helper=helper,
        )  # fmt: skip
        fits["source"] = str(path)
        fits["exclude"] = sorted(map(str, exclude))
        fits["flops_requested"] = flops
        fits["include_stale"] = bool(include_stale)
        out_dir.mkdir(parents=True, exist_ok=True)
        figs = figures.draw_all(pts, fits, out_dir, helper) if figures_ else []
    fits["outputs"] = write_outputs(out_dir, fits, figs) | {"figures": figs} | beyond.write_files(fits, out_dir)
    return fits


def plot_path(path, out_dir=None) -> list[str]:
    """Redraw the figures of ``path`` from the fits.json a previous fit_path wrote in ``out_dir``."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(path)
    fits_file = out_dir / "fits.json"
    if not fits_file.is_file():
        raise AnalysisError(f"{fits_file} not found: run `chinchax fit {path}` (analysis.fit_path) first")
    fits = read_json(fits_file)
    missing = [k for k in FITS_KEYS if k not in fits]
    if missing:
        raise AnalysisError(f"{fits_file} lacks {', '.join(missing)}: not a complete fits.json; rerun `chinchax fit {path}`")
    runs, curves = load_runs(path, include_stale=fits.get("include_stale", False))
    pts = prepare(runs, curves, flops=fits.get("flops_requested", fits["flops_convention"]),
                  n_params=fits["n_params_column"], loss=fits["loss_column"], exclude=fits.get("exclude", ()))  # fmt: skip
    with helper_process() as helper:
        return figures.draw_all(pts, fits, out_dir, helper)
