"""Emergence figures (matplotlib Agg, PNG + PDF, the look of analysis.figures):

- ``emergence_<x>_<metric>``: Wei et al. 2022 Figure 2 style, metric vs training FLOPs (x=flops)
  and vs N (x=params), one panel per task, seed mean with min-max bars over seeds (item
  bootstrap CI for a single seed), random baseline dashed, fraction of seeds solving annotated;
- ``emergence_mirage``: Schaeffer et al. 2023, the same outputs scored by exact match (with
  p^L and the per-position product overlaid), per-token accuracy and normalised edit distance;
- ``emergence_loss_<metric>``: Du et al. 2024, metric vs eval loss for every run and evaluated
  step, coloured by N, with the fitted ramp and its loss threshold;
- ``emergence_steps``: metric vs training step, one line per run, where runs have several evaluations.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from analysis.emergence_metrics import (
    EXACT_MATCH,
    METRICS,
    POSITION_PREFIX,
    PRED_PL,
    PRED_POSITIONS,
    PREDICTIONS,
    SOLVE_THRESHOLD,
    seed_summary,
)  # fmt: skip
from analysis.emergence_table import loss_thresholds, ramp
from analysis.figures import CMAP, _save, _tidy_log_axes


def _save_once(fig, out_dir: Path, name: str) -> list[str]:
    """analysis.figures._save, with the constrained layout solved once instead of once per format
    (it is most of the drawing time); ticks are tidied first so the layout sees the final labels."""
    _tidy_log_axes(fig)
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine("none")
    return _save(fig, out_dir, name)

LABELS = {
    "exact_match": "exact match", "token_accuracy": "per-token accuracy", "edit_distance": "edit distance (tokens)",
    "edit_distance_norm": "edit distance / target length", "target_logprob": "log p(target) (nats)",
    "mc_accuracy": "multiple-choice accuracy", "brier": "Brier score", PRED_PL: "p^L (mean per-token acc.)",
    PRED_POSITIONS: "product of per-position acc.",
}  # fmt: skip
# Headline metrics drawn against scale and loss by default (the mirage figure shows the smooth ones).
DEFAULT_METRICS = ("exact_match", "mc_accuracy", "brier", "token_accuracy")
SOURCE_MARKERS = ("o", "s", "^", "D", "v", "P")


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


def default_metrics(table: pd.DataFrame) -> list[str]:
    """DEFAULT_METRICS present in the table, then any metric of an external table (not ours)."""
    have = list(dict.fromkeys(table["metric"]))
    ours = set(METRICS) | set(PREDICTIONS)
    extra = [m for m in have if m not in ours and not m.startswith(POSITION_PREFIX)]
    return [m for m in DEFAULT_METRICS if m in have] + extra


def _grid(n: int, width: float = 3.6, height: float = 3.0):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), layout="constrained", squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _x_label(x: str, table: pd.DataFrame) -> str:
    if x == "n_params":
        return "N, parameters"
    convs = sorted(set(table["flops_convention"].dropna().astype(str)))
    return f"C, training FLOPs ({', '.join(convs) or '?'})"


def _draw_series(ax, g: pd.DataFrame, x: str, marker: str, name: str | None, colour=None, annotate: bool = False):
    """Seed means vs x with bars: min-max over seeds, or the item CI where there is one seed."""
    g = g.sort_values(x)
    many = g["n_seeds"] > 1
    lo = np.where(many, g["min"], g["ci_lo"])
    hi = np.where(many, g["max"], g["ci_hi"])
    mean = g["mean"].to_numpy(float)
    err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
    err = np.where(np.isfinite(err), err, 0.0)
    line = ax.errorbar(g[x], mean, yerr=err, marker=marker, ms=4, lw=1.2, capsize=2, label=name, color=colour)
    if annotate:
        for xv, yv, f, k in g[[x, "mean", "frac_solved", "n_seeds"]].itertuples(index=False):
            if k > 1 and np.isfinite(f):
                ax.annotate(f"{f * k:.0f}/{k:.0f}", (xv, yv), textcoords="offset points", xytext=(3, 5),
                            fontsize=7, color=line[0].get_color())  # fmt: skip
    return line


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _baseline(ax, g: pd.DataFrame) -> None:
    b = g["baseline"].dropna()
    if not b.empty:
        ax.axhline(float(b.mean()), ls="--", color="grey", lw=1, label="random baseline")


def plot_scale(summary: pd.DataFrame, metric: str, x: str, out_dir: Path, xlabel: str,
               solve_threshold: float = SOLVE_THRESHOLD) -> list[str]:  # fmt: skip
    """Wei-style panels: ``metric`` (seed mean, bars over seeds) vs ``x`` ("flops" or "n_params"), one per task."""
    s = summary[(summary["metric"] == metric) & np.isfinite(summary[x].to_numpy(float))]
    if s.empty:
        return []
    tasks = sorted(s["task"].unique())
    fig, axes = _grid(len(tasks))
    sources = list(dict.fromkeys(s["source"]))
    for ax, task in zip(axes, tasks):
        g = s[s["task"] == task]
        for i, src in enumerate(sources):
            gs = g[g["source"] == src]
            if not gs.empty:
                name = Path(str(src)).name if len(sources) > 1 else None
                _draw_series(ax, gs, x, SOURCE_MARKERS[i % len(SOURCE_MARKERS)], name, annotate=metric == EXACT_MATCH)
        _baseline(ax, g)
        ax.set(xscale="log", title=task, xlabel=xlabel, ylabel=label(metric))
        _legend(ax)
    solved = f"; k/n: seeds with exact match >= {solve_threshold:g}" if metric == EXACT_MATCH else ""
    fig.suptitle(f"{label(metric)} vs {'training FLOPs' if x == 'flops' else 'N'}\nbars: min-max over seeds "
                 f"(item 95% CI for one seed){solved}", fontsize=10)  # fmt: skip
    return _save_once(fig, out_dir, f"emergence_{'flops' if x == 'flops' else 'params'}_{metric}")


def plot_mirage(summary: pd.DataFrame, out_dir: Path) -> list[str]:
    """Per task: exact match with its two predictions | per-token accuracy | edit distance / length, vs N."""
    have = summary.groupby("task")["metric"].agg(set)
    tasks = sorted(t for t, ms in have.items() if {EXACT_MATCH, "token_accuracy"} <= ms)
    if not tasks:
        return []
    panels = (("exact match (sharp)", (EXACT_MATCH, PRED_PL, PRED_POSITIONS)), ("per-token accuracy (smooth)", ("token_accuracy",)),
              ("token edit distance (smooth)", ("edit_distance_norm",)))  # fmt: skip
    fig, axes = plt.subplots(len(tasks), 3, figsize=(11, 2.9 * len(tasks)), layout="constrained", squeeze=False)
    styles = {PRED_PL: ("--", "x"), PRED_POSITIONS: (":", "+")}
    for row, task in zip(axes, tasks):
        g = summary[summary["task"] == task]
        for ax, (title, metrics) in zip(row, panels):
            for m in metrics:
                gm = g[g["metric"] == m].sort_values("n_params")
                if gm.empty:
                    continue
                if m in styles:  # predictions: lines only, no bars, so the measurement stays readable
                    ax.plot(gm["n_params"], gm["mean"], styles[m][0], marker=styles[m][1], lw=1.2, label=label(m))
                else:
                    _draw_series(ax, gm, "n_params", "o", label(m))
            if metrics[0] == EXACT_MATCH:
                _baseline(ax, g[g["metric"] == EXACT_MATCH])
            ax.set(xscale="log", title=f"{task}: {title}", xlabel="N, parameters", ylabel=label(metrics[0]))
            _legend(ax)
    fig.suptitle("The same outputs, scored three ways (Schaeffer et al. 2023); bars: seed min-max")
    return _save_once(fig, out_dir, "emergence_mirage")


def plot_loss(table: pd.DataFrame, fits: list[dict], metric: str, out_dir: Path) -> list[str]:
    """Metric vs eval loss (decreasing to the right) for every run and step, coloured by N, with the ramp fit."""
    t = table[(table["metric"] == metric) & np.isfinite(table["eval_loss"].to_numpy(float))]
    if t.empty:
        return []
    tasks = sorted(t["task"].unique())
    fig, axes = _grid(len(tasks))
    n = t["n_params"].to_numpy(float)
    norm = LogNorm(vmin=np.nanmin(n), vmax=max(np.nanmax(n), np.nanmin(n) * 1.01))
    fit_by = {(f["source"], f["task"]): f for f in fits if f["metric"] == metric}
    for ax, task in zip(axes, tasks):
        g = t[t["task"] == task]
        for i, (src, gs) in enumerate(g.groupby("source", sort=False)):
            ax.scatter(gs["eval_loss"], gs["value"], c=gs["n_params"], cmap=CMAP, norm=norm, s=14,
                       marker=SOURCE_MARKERS[i % len(SOURCE_MARKERS)])  # fmt: skip
            f = fit_by.get((src, task))
            if f and f["threshold"] is not None:
                grid = np.linspace(gs["eval_loss"].min(), gs["eval_loss"].max(), 100)
                ax.plot(grid, ramp(grid, f["threshold"], f["saturation"], f["level"], f["rise"]), "k-", lw=1)
                ax.axvline(f["threshold"], color="tab:red", ls=":", lw=1, label=f"threshold {f['threshold']:.3g} nats")
        _baseline(ax, g)
        ax.set(title=task, xlabel="eval loss (nats/token, decreasing)", ylabel=label(metric))
        ax.invert_xaxis()
        _legend(ax)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), ax=list(axes[: len(tasks)]), label="N, parameters")
    fig.suptitle(f"{label(metric)} vs pre-training loss (Du et al. 2024)\nramp fit and its loss threshold", fontsize=10)
    return _save_once(fig, out_dir, f"emergence_loss_{metric}")


def plot_steps(table: pd.DataFrame, out_dir: Path, metrics=(EXACT_MATCH, "token_accuracy")) -> list[str]:
    """Metric vs training step for runs evaluated at several steps (solid: first metric, dashed: second)."""
    t = table[table["metric"].isin(metrics) & np.isfinite(table["step"].to_numpy(float))]
    counts = t.groupby(["source", "run", "task"])["step"].nunique()
    multi = counts[counts > 1].reset_index()[["source", "run", "task"]]
    if multi.empty:
        return []
    t = t.merge(multi, on=["source", "run", "task"])
    tasks = sorted(t["task"].unique())
    fig, axes = _grid(len(tasks))
    n = t["n_params"].to_numpy(float)
    norm = LogNorm(vmin=np.nanmin(n), vmax=max(np.nanmax(n), np.nanmin(n) * 1.01))
    cmap = plt.get_cmap(CMAP)
    for ax, task in zip(axes, tasks):
        for (run, metric), g in t[t["task"] == task].groupby(["run", "metric"]):
            g = g.sort_values("step")
            ls = "-" if metric == metrics[0] else "--"
            ax.plot(g["step"], g["value"], ls, marker=".", color=cmap(norm(g["n_params"].iloc[0])), lw=1)
        ax.set(title=task, xlabel="training step", ylabel=" / ".join(label(m) for m in metrics))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), ax=list(axes[: len(tasks)]), label="N, parameters")
    fig.suptitle(f"Ability during training, one line per run\n{label(metrics[0])} (solid), {label(metrics[-1])} (dashed)",
                 fontsize=10)  # fmt: skip
    return _save_once(fig, out_dir, "emergence_steps")


def draw_emergence(table: pd.DataFrame, out_dir, metrics=None, solve_threshold: float = SOLVE_THRESHOLD,
                   thresholds: list[dict] | None = None) -> list[str]:  # fmt: skip
    """Every emergence figure the table supports; returns the written paths (PNG and PDF).

    metrics: the metrics drawn against scale and loss (default: ``default_metrics``).
    thresholds: loss_thresholds(table) if already computed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics) if metrics is not None else default_metrics(table)
    final = table[table["final"].astype(bool)]
    summary = seed_summary(final, solve_threshold)
    thresholds = thresholds if thresholds is not None else loss_thresholds(table, metrics)
    paths = []
    for metric in metrics:
        for x in ("flops", "n_params"):
            paths += plot_scale(summary, metric, x, out_dir, _x_label(x, final), solve_threshold)
    paths += plot_mirage(summary, out_dir)
    for metric in metrics:
        paths += plot_loss(table, thresholds, metric, out_dir)
    paths += plot_steps(table, out_dir)
    return paths
