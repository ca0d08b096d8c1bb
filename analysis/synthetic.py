"""Synthetic sweeps from a known Chinchilla law, for tests, benchmarks and demos.

An IsoFLOP grid: for each budget C, model sizes spread around the true N_opt(C), each
trained for D = C / (6 N) tokens, final loss L(N, D) times log-normal noise. Training
curves follow L(N, tokens seen) with smaller noise, i.e. the idealised case in which the
envelope of the curves is the compute-optimal frontier (so all three approaches agree).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from rundir import write_text_atomic
from analysis.parametric import compute_optimal, predict

TRUE_PARAMS = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def isoflop_sweep(
    params=None, budgets=(1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21), n_sizes=7, spread_dex=0.8,
    noise=0.01, curve_points=24, curve_noise=0.003, seed=0, centre_exponent=None, sizes=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(runs, curves) DataFrames in the load_runs layout, with flops_6N = 6 N D exactly.

    n_sizes model sizes per budget, log-spaced over +-spread_dex/2 decades around the true N_opt;
    with centre_exponent e, around a planner's guess instead: the true N_opt at the middle budget
    times (C / C_middle)^e (e = 0.5: a fixed tokens-per-parameter rule, as sweep specs use).
    sizes: per budget, the model sizes to train (a sweep spec's grid; overrides the three above).
    noise: std of the multiplicative log-normal noise on final losses.
    """
    params = dict(TRUE_PARAMS if params is None else params)
    rng = np.random.default_rng(seed)
    runs, curves = [], []
    c_mid = float(np.sqrt(np.min(budgets) * np.max(budgets)))
    for c in budgets:
        n_opt, _ = compute_optimal(params, c)
        if centre_exponent is not None:
            n_opt = compute_optimal(params, c_mid)[0] * (c / c_mid) ** centre_exponent
        grid = np.geomspace(n_opt * 10 ** (-spread_dex / 2), n_opt * 10 ** (spread_dex / 2), n_sizes)
        for n in grid if sizes is None else sizes[c]:
            n = float(np.round(n))
            d = float(np.round(c / (6 * n)))
            name = f"C{c:.0e}_N{n:.3e}".replace("+", "")
            loss = float(predict(params, n, d) * np.exp(noise * rng.standard_normal()))
            tok = np.geomspace(d / 300, d, curve_points)
            curve = predict(params, n, tok) * np.exp(curve_noise * rng.standard_normal(curve_points))
            curve[-1] = loss
            steps = np.maximum(1, np.round(tok / 65536)).astype(int)
            for s, t, l in zip(steps, tok, curve):
                curves.append({"run": name, "step": int(s), "tokens": float(t), "flops_6N": 6 * n * t,
                               "flops_6N+attention": 6 * n * t * 1.05, "loss": float(l), "train_loss": float(l)})  # fmt: skip
            runs.append({
                "run": name, "status": "done", "error": None, "n_params_total": n, "n_params_nonembed": n,
                "n_params_active": n, "n_params_active_nonembed": n, "tokens": d, "dataset_tokens": None,
                "steps": int(steps[-1]), "flops_6N": 6 * n * d, "flops_6N+attention": 6 * n * d * 1.05,
                "final_eval_loss": loss, "best_eval_loss": float(curve.min()), "final_train_loss": loss,
                "entropy_rate": None,
            })  # fmt: skip
    return pd.DataFrame(runs), pd.DataFrame(curves)



def write_sweep(sweep_dir, runs: pd.DataFrame, curves: pd.DataFrame) -> Path:
    """Write runs/curves as run directories (result.json, metrics.jsonl) per the run-directory contract."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for _, r in runs.iterrows():
        run_dir = sweep_dir / r["run"]
        run_dir.mkdir(exist_ok=True)
        lines = []
        for _, c in curves[curves["run"] == r["run"]].iterrows():
            rec = {"step": int(c["step"]), "tokens": int(c["tokens"]),
                   "flops": {"6N": float(c["flops_6N"]), "6N+attention": float(c["flops_6N+attention"])},
                   "train_loss": float(c["train_loss"]), "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": None}  # fmt: skip
            if np.isfinite(c["loss"]):
                rec["eval_loss"] = float(c["loss"])
            lines.append(json.dumps(rec))
        write_text_atomic(run_dir / "metrics.jsonl", "\n".join(lines) + "\n")
        result = {
            "status": r["status"], "error": r.get("error"), "run_name": r["run"], "step": int(r["steps"]),
            "steps": int(r["steps"]), "tokens": int(r["tokens"]), "dataset_tokens": None,
            "n_params_total": int(r["n_params_total"]), "n_params_nonembed": int(r["n_params_nonembed"]),
            "n_params_active": int(r["n_params_active"]), "n_params_active_nonembed": int(r["n_params_active_nonembed"]),
            "flops": {"6N": float(r["flops_6N"]), "6N+attention": float(r["flops_6N+attention"])},
            "flops_per_token": {"6N": 6.0 * r["n_params_total"], "6N+attention": 6.3 * r["n_params_total"]},
            "final_train_loss": float(r["final_train_loss"]), "final_eval_loss": float(r["final_eval_loss"]),
            "best_eval_loss": float(r["best_eval_loss"]), "entropy_rate": None, "wall_time_s": 1.0,
            "tokens_per_s": 1.0, "hardware": {}, "versions": {},
        }  # fmt: skip
        write_text_atomic(run_dir / "result.json", json.dumps(result, indent=1))
    return sweep_dir
