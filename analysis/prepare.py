"""Turn loaded runs/curves into the tidy point tables the fits use (one FLOP convention, one N)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from analysis.load import AnalysisError, check_positive, finished, select_flops

# Carried into Points.points when present: the laws of analysis.beyond need them.
OPTIONAL_COLUMNS = ("dataset_tokens", "lr", "batch_tokens")


@dataclasses.dataclass(frozen=True)
class Points:
    """Final points (one per finished run) and curve points, in one FLOP convention.

    points: run, n_params, n_params_kaplan, tokens, flops, loss, steps, and where the data has them
            dataset_tokens, lr, batch_tokens (NaN where a run lacks them; analysis.beyond laws need them)
    curves: run, step, tokens, flops, loss, n_params   (loss = eval loss, NaN rows dropped)
    """

    points: pd.DataFrame
    curves: pd.DataFrame
    flops_convention: str
    n_params_column: str
    kaplan_n_column: str
    loss_column: str
    messages: tuple[str, ...]

    @property
    def has_curves(self) -> bool:
        """True when most runs logged at least 2 evaluated points (curves, not just final points)."""
        if self.curves.empty:
            return False
        sizes = self.curves.groupby("run").size()
        return bool((sizes >= 2).mean() >= 0.5)


def prepare(runs, curves, *, flops="auto", n_params="n_params_total", loss="final_eval_loss", exclude=()) -> Points:
    """Select finished runs, one N column, one FLOP convention; validate values (errors name runs).

    n_params: column used as N for Chinchilla fits (n_params_total, n_params_nonembed,
    n_params_active, ...). Kaplan's L(N) uses n_params_nonembed when present.
    flops: see analysis.load.select_flops. loss: final_eval_loss or best_eval_loss.
    """
    runs, curves, messages = finished(runs, curves, exclude)
    if runs.empty:
        raise AnalysisError("no finished runs to fit (status 'done')")
    if n_params not in runs or runs[n_params].isna().all():
        have = [c for c in runs.columns if c.startswith("n_params")]
        raise AnalysisError(f"N column {n_params!r} not in the data; N columns present: {have}")
    if loss not in runs:
        raise AnalysisError(f"loss column {loss!r} missing (have {list(runs.columns)})")
    check_positive(runs, [n_params, "tokens", loss])
    conv, c_runs, c_curves = select_flops(runs, curves, flops)
    n = runs[n_params].to_numpy(float)
    d = runs["tokens"].to_numpy(float)
    n_by_run = dict(zip(runs["run"], n))
    curves = curves.copy()
    curves["n_params"] = curves["run"].map(n_by_run).astype(float)
    if conv == "6ND":
        c_runs = 6.0 * n * d
        curves["flops"] = 6.0 * curves["n_params"] * pd.to_numeric(curves.get("tokens"), errors="coerce")
        messages.append("C = 6 N D computed from the chosen N and tokens (no FLOP convention in the data)")
    else:
        curves["flops"] = np.nan if c_curves is None else pd.to_numeric(c_curves, errors="coerce").to_numpy(float)
    runs = runs.assign(flops=c_runs)
    check_positive(runs, ["flops"])
    kaplan_col = "n_params_nonembed" if "n_params_nonembed" in runs and runs["n_params_nonembed"].gt(0).all() else n_params
    points = pd.DataFrame(
        {
            "run": runs["run"].astype(str),
            "n_params": n,
            "n_params_kaplan": runs[kaplan_col].to_numpy(float),
            "tokens": d,
            "flops": runs["flops"].to_numpy(float),
            "loss": runs[loss].to_numpy(float),
            "steps": pd.to_numeric(runs["steps"], errors="coerce").to_numpy(float) if "steps" in runs else np.nan,
        }
    )
    for col in OPTIONAL_COLUMNS:
        if col in runs:
            points[col] = pd.to_numeric(runs[col], errors="coerce").to_numpy(float)
    cols = ["run", "step", "tokens", "flops", "loss", "n_params"]
    for col in cols:
        if col not in curves:
            curves[col] = np.nan
    curves = curves[cols]
    curves = curves[np.isfinite(curves["loss"]) & (curves["loss"] > 0) & (curves["flops"] > 0)].reset_index(drop=True)
    return Points(points, curves, conv, n_params, kaplan_col, loss, tuple(messages))
