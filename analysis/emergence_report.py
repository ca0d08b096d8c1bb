"""One call from a sweep/run directory or a published table to the emergence figures, table and report.

``emergence_path`` writes into ``out_dir``: emergence_metrics.csv (the tidy table: one row per
run, task, step and metric, with item-bootstrap CIs), emergence.json (rule, emergence table,
per-size accuracy, loss thresholds, outputs), emergence.md (the same for reading) and the
figures of analysis.emergence_figures (PNG + PDF).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd

from analysis.emergence_figures import default_metrics, draw_emergence, label
from analysis.emergence_load import load_emergence
from analysis.emergence_metrics import (
    CI_PERCENTILES,
    EXACT_MATCH,
    METRICS,
    POSITION_PREFIX,
    PRED_PL,
    PRED_POSITIONS,
    PREDICTIONS,
    SOLVE_THRESHOLD,
    seed_summary,
)
from analysis.emergence_table import MARGIN, emergence_table, loss_thresholds, rule_text
from analysis.load import AnalysisError, AnalysisWarning
from rundir import not_a_folder, write_json_atomic, write_text_atomic

# Columns of the per-size accuracy section (seed means), in this order when present.
ACCURACY_METRICS = (EXACT_MATCH, "token_accuracy", PRED_PL, PRED_POSITIONS, "edit_distance_norm", "mc_accuracy", "brier")


def default_out_dir(path) -> Path:
    """``<dir>/emergence`` for a sweep or run directory; ``<table stem>_emergence/`` next to a table."""
    path = Path(path)
    return path.with_name(f"{path.stem}_emergence") if path.is_file() else path / "emergence"


def _num(v, fmt: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def accuracy_by_size(table: pd.DataFrame, solve_threshold: float = SOLVE_THRESHOLD) -> list[dict]:
    """Per (source, task, model size), final evaluations: seed mean, min and max of ACCURACY_METRICS,
    number of seeds and the fraction of seeds solving the task (exact match >= solve_threshold)."""
    s = seed_summary(table[table["final"].astype(bool)], solve_threshold)
    ours = set(METRICS) | set(PREDICTIONS)  # of ours, the accuracy columns; an external table's metrics all
    s = s[s["metric"].isin(ACCURACY_METRICS) | ~(s["metric"].isin(ours) | s["metric"].str.startswith(POSITION_PREFIX))]
    rows = []
    for (source, task, model), g in s.groupby(["source", "task", "model"], sort=False):
        first = g.iloc[0]
        row = {"source": source, "task": task, "model": model, "n_params": first["n_params"], "flops": first["flops"],
               "eval_loss": first["eval_loss"], "n_seeds": int(g["n_seeds"].max()), "frac_solved": first["frac_solved"],
               "n_items": first["n_items"], "metrics": {}}  # fmt: skip
        for m, mean, lo, hi in g[["metric", "mean", "min", "max"]].itertuples(index=False):
            row["metrics"][m] = {"mean": mean, "min": lo, "max": hi}
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["source"]), r["task"], r["n_params"]))


def _markdown(result: dict) -> str:
    lines = ["# Emergence", "", (f"Sources: {', '.join(map(str, result['sources']))}. "
             f"{result['n_runs']} runs, tasks: {', '.join(result['tasks'])}. Item intervals: "
             f"{result['ci_percentiles'][0]:g}-{result['ci_percentiles'][1]:g} percentile bootstrap over items "
             f"({result['n_bootstrap']} resamples, seed {result['seed']})."), "", "## Rule", "", result["rule"], "",
             "## Emergence table", "",
             "| source | task | metric | baseline | above when | N at emergence | C at emergence | last N below | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in result["emergence"]:
        n, c = r["n_params"], r["flops"]
        status = n["status"] + (" (not monotone: first above at N={:.3g})".format(n["first_above"])
                                if n["first_above"] is not None and n["at"] is not None and n["first_above"] < n["at"] else "")  # fmt: skip
        op = ">" if r["higher_is_better"] else "<"
        lines.append(f"| {Path(str(r['source'])).name} | {r['task']} | {r['metric']} | {_num(r['baseline'])} | "
                     f"{op} {_num(n['threshold'])} | {_num(n['at'])} | {_num(c['at'])} | {_num(n['last_below'])} | {status} |")  # fmt: skip
    if not result["emergence"]:
        lines.append("| (no metric with a random baseline) | | | | | | | | |")
    lines += ["", "## Accuracy per model size (final evaluations, mean over seeds [min, max])", ""]
    present = [m for m in ACCURACY_METRICS if any(m in r["metrics"] for r in result["accuracy"])]
    extra = sorted({m for r in result["accuracy"] for m in r["metrics"]} - set(ACCURACY_METRICS))
    shown = present + extra
    lines += ["| source | task | N | C | seeds | solved | " + " | ".join(label(m) for m in shown) + " |",
              "| --- " * (6 + len(shown)) + "|"]  # fmt: skip
    for r in result["accuracy"]:
        cells = []
        for m in shown:
            v = r["metrics"].get(m)
            cells.append("-" if v is None else f"{_num(v['mean'])}" + (f" [{_num(v['min'])}, {_num(v['max'])}]" if r["n_seeds"] > 1 else ""))
        solved = "-" if r["frac_solved"] is None or not math.isfinite(r["frac_solved"]) else f"{r['frac_solved'] * r['n_seeds']:.0f}/{r['n_seeds']}"
        lines.append(f"| {Path(str(r['source'])).name} | {r['task']} | {_num(r['n_params'])} | {_num(r['flops'])} | "
                     f"{r['n_seeds']} | {solved} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", ("p^L: mean per-token accuracy to the power of the target length; per-position product: product of the "
              "accuracies at each target position (Schaeffer et al. 2023). Both predict exact match when token errors "
              "are independent."), "", "## Loss thresholds (Du et al. 2024)", "",
              ("Ramp fit over every run and evaluated step: metric = level for eval loss >= threshold, rising "
               "linearly to level + rise at the saturation loss and flat below it."), "",
              "| source | task | metric | threshold (nats/token) | saturation (nats/token) | level | rise | R^2 | points |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for f in result["loss_thresholds"]:
        lines.append(f"| {Path(str(f['source'])).name} | {f['task']} | {f['metric']} | {_num(f['threshold'], '.4g')} | "
                     f"{_num(f['saturation'], '.4g')} | {_num(f['level'])} | {_num(f['rise'])} | {_num(f['r2'])} | {f['n_points']} |")  # fmt: skip
    if not result["loss_thresholds"]:
        lines.append("| (no eval losses) | | | | | | | | |")
    figs = result["outputs"].get("figures", [])
    lines += ["", "## Figures", ""] + [f"- {Path(p).name}" for p in figs if p.endswith(".png")]
    if not figs:
        lines.append("- (none drawn)")
    return "\n".join(lines) + "\n"


def emergence_path(
    path, out_dir=None, *, overlay=(), n_bootstrap=1000, seed=0, margin=MARGIN, solve_threshold=SOLVE_THRESHOLD,
    n_params="n_params_total", flops="auto", metrics=None, include_stale=False, figures_=True,
) -> dict:  # fmt: skip
    """Score, tabulate and plot abilities against scale for a sweep/run directory or a CSV table.

    path: a sweep directory, a run directory (evals/ records are scored here, without JAX) or
    a CSV/TSV of model, n_params, flops, task, metric, value (optional baseline, n_items, ...).
    overlay: more such paths drawn and tabulated alongside (e.g. a published table on our runs).
    n_bootstrap, seed: item-bootstrap resamples for the CIs. margin: the emergence margin over
    the random baseline, in the metric's units. solve_threshold: exact match at which a seed
    solves a task. n_params: the N field of result.json. flops: "auto", "6N" or "6N+attention".
    metrics: metrics drawn against scale and loss (default: the headline ones present).
    Writes emergence_metrics.csv, emergence.json, emergence.md and figures into ``out_dir``
    (default ``default_out_dir(path)``); returns the emergence.json content as a dict.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(path)
    problem = not_a_folder(out_dir)
    if problem:  # found before any scoring
        raise AnalysisError(f"cannot write the emergence report to {out_dir}: {problem}")
    sources = [Path(p) for p in (path, *overlay)]
    tables = [load_emergence(p, n_params=n_params, flops=flops, n_bootstrap=n_bootstrap, seed=seed,
                             include_stale=include_stale) if Path(p).is_dir() else load_emergence(p)
              for p in sources]  # fmt: skip
    table = pd.concat(tables, ignore_index=True)
    convs = sorted(set(table["flops_convention"].dropna().astype(str)))
    if len(convs) > 1:
        warnings.warn(f"FLOPs of different conventions drawn on one axis ({', '.join(convs)}): compare their "
                      "positions along C with care", AnalysisWarning, stacklevel=2)  # fmt: skip
    metrics = list(metrics) if metrics is not None else default_metrics(table)
    unknown = [m for m in metrics if m not in set(table["metric"])]
    if unknown:
        raise AnalysisError(f"metrics {unknown} are not in the data (have {sorted(set(table['metric']))})")
    thresholds = loss_thresholds(table, metrics)
    result = {
        "source": str(path), "sources": [str(p) for p in sources], "rule": rule_text(margin, solve_threshold),
        "margin": margin, "solve_threshold": solve_threshold, "n_bootstrap": n_bootstrap, "seed": seed,
        "ci_percentiles": list(CI_PERCENTILES), "flops_conventions": convs,
        "n_runs": int(table["run"].nunique()), "tasks": sorted(table["task"].unique()),
        "emergence": emergence_table(table, margin, solve_threshold),
        "accuracy": accuracy_by_size(table, solve_threshold), "loss_thresholds": thresholds,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = draw_emergence(table, out_dir, metrics, solve_threshold, thresholds) if figures_ else []
    files = {name: str(out_dir / name) for name in ("emergence_metrics.csv", "emergence.json", "emergence.md")}
    result["outputs"] = files | {"figures": figs}
    write_text_atomic(files["emergence_metrics.csv"], table.to_csv(index=False))
    write_json_atomic(files["emergence.json"], result)
    write_text_atomic(files["emergence.md"], _markdown(result))
    return result

