"""Are the 80% intervals of the compute-optimal exponent a honest? Coverage on synthetic sweeps.

    python benchmarks/interval_coverage.py                 # 200 sweeps per grid, 200 resamples each
    python benchmarks/interval_coverage.py --sweeps 40     # quicker, coarser
    python benchmarks/interval_coverage.py --workers 4 --grids quickstart
    python benchmarks/interval_coverage.py --out cov.jsonl --a3-starts 300   # resumable; cheaper Approach-3 search

Approach 3 takes ~95% of the time (its 4,500-start grid search, then the bootstrap); --a3-starts K
searches a random K of the 4,500 starts instead (on these law-generated sweeps the optimum is
found from far fewer; the bootstrap, warm-started from that optimum, is unchanged). --out appends
one line per fitted sweep and skips those already there, so an interrupted run resumes.

Each synthetic sweep draws final losses from an Approach-3 law with known a = beta / (alpha +
beta) on the IsoFLOP grid of a shipped spec, times log-normal seed noise, and runs the fits of
`chinchax fit` (analysis.pipeline.fit_points; 10th-90th percentile bootstrap intervals). The
table gives, per approach, how often the interval contains the true a, its mean width, and the
mean and spread of the estimate around the truth. Target: coverage 70%-90% for Approaches 2 and 3.

Grids (C = 6 N D, N = the spec's sizes):
- quickstart: experiments/quickstart.yaml's 3 budgets x 4 sizes; the law is the Approach-3 fit
  of a quickstart run (E 1.12, A 27.7, B 2266, alpha 0.503, beta 0.652; a = 0.565); noise 0.9%,
  the seed-to-seed spread of ln loss measured on two quickstart runs of every grid point.
- chinchilla_isoflop: experiments/chinchilla_isoflop.yaml's 4 budgets x 5 sizes (N_opt/3 ... 3
  N_opt at 20 tokens per parameter); Chinchilla's exponents (alpha 0.34, beta 0.28; a = 0.452)
  with B set so that 20 tokens per parameter is optimal at the middle budget; noise 0.5%
  (assumed: larger models and a 1M-token eval set scatter less than the quickstart's).
Training curves follow the law with 0.3% noise (the idealised case for Approach 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.parametric import compute_optimal  # noqa: E402

QUICKSTART_LAW = {"E": 1.1202, "A": 27.742, "B": 2265.9, "alpha": 0.50256, "beta": 0.65219}
QUICKSTART_SIZES = {1e11: [3e3, 7e3, 1.5e4, 3.5e4], 3e11: [5e3, 1.2e4, 3e4, 7e4], 1e12: [1e4, 2.5e4, 6e4, 1.5e5]}
CHINCHILLA_BUDGETS = (1.5e14, 3e14, 6e14, 1.2e15)


def chinchilla_law() -> dict:
    """alpha 0.34, beta 0.28, A 406.4, E 1.69; B such that N_opt = sqrt(C / 120) at the middle budget."""
    p = {"E": 1.69, "A": 406.4, "alpha": 0.34, "beta": 0.28}
    c = float(np.sqrt(CHINCHILLA_BUDGETS[0] * CHINCHILLA_BUDGETS[-1]))
    a = p["beta"] / (p["alpha"] + p["beta"])
    g = np.sqrt(c / 120) / (c / 6) ** a  # N_opt = G (C/6)^a, G = (alpha A / (beta B))^(1/(alpha+beta))
    p["B"] = float(p["alpha"] * p["A"] / (p["beta"] * g ** (p["alpha"] + p["beta"])))
    assert np.isclose(compute_optimal(p, c)[0], np.sqrt(c / 120))
    return p


def grids() -> dict:
    cl = chinchilla_law()
    chin_sizes = {c: list(np.geomspace(np.sqrt(c / 120) / 3, 3 * np.sqrt(c / 120), 5)) for c in CHINCHILLA_BUDGETS}
    return {
        "quickstart": {"law": QUICKSTART_LAW, "budgets": tuple(QUICKSTART_SIZES), "sizes": QUICKSTART_SIZES, "noise": 0.009},
        "chinchilla_isoflop": {"law": cl, "budgets": CHINCHILLA_BUDGETS, "sizes": chin_sizes, "noise": 0.005},
    }


def one_sweep(args):
    """Fit one synthetic sweep; returns (grid, seed, {approach: (a, low, high)})."""
    grid_name, seed, n_bootstrap, wanted, a3_starts = args
    from analysis import parametric
    from analysis.pipeline import fit_points
    from analysis.prepare import prepare
    from analysis.synthetic import isoflop_sweep

    g = grids()[grid_name]
    runs, curves = isoflop_sweep(params=g["law"], budgets=g["budgets"], sizes=g["sizes"], noise=g["noise"],
                                 curve_points=12, seed=seed)  # fmt: skip
    pts = prepare(runs, curves, flops="6N")
    if a3_starts and not hasattr(parametric, "_full_grid"):
        parametric._full_grid = parametric.init_grid
        grid = parametric._full_grid()
        subset = grid[np.random.default_rng(12345).choice(len(grid), a3_starts, replace=False)]
        parametric.init_grid = lambda: subset.copy()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("local", "akima", "parabola"):
            approaches = tuple(a for a in (("1", "2", "3") if method == "local" else ("2",)) if a in wanted)
            if not approaches:
                continue
            try:
                fits = fit_points(pts, approaches=approaches, laws=(), budgets=[1e15], n_bootstrap=n_bootstrap,
                                  seed=seed, extrapolation=False, progress=False, approach2=method)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - a failed fit counts as a miss, and is reported
                out[f"2 ({method})"] = ("failed", str(err))
                continue
            for a, res in fits["approaches"].items():
                key = a if a != "2" else f"2 ({method})"
                est = res["a"] if a != "3" else res["derived"]["a"]
                iv = (res.get("intervals") or {}).get("a") or {}
                out[key] = (est, iv.get("low"), iv.get("high"))
    return grid_name, seed, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", type=int, default=200, help="synthetic sweeps per grid (default 200)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per fit (default 200)")
    ap.add_argument("--grids", nargs="+", default=list(grids()), choices=list(grids()))
    ap.add_argument("--approaches", nargs="+", default=["1", "2", "3"], choices=["1", "2", "3"],
                    help="approaches to fit (3 takes ~95%% of the time)")
    ap.add_argument("--a3-starts", type=int, default=0, help="Approach 3: a random K of the 4,500 grid starts (0: all)")
    ap.add_argument("--out", type=Path, default=None, help="JSONL of per-sweep results: appended, and resumed from")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (default min(4, cores))")
    args = ap.parse_args(argv)
    truth = {name: g["law"]["beta"] / (g["law"]["alpha"] + g["law"]["beta"]) for name, g in grids().items()}
    results = {name: {} for name in args.grids}
    if args.out and args.out.exists():
        for line in args.out.read_text().splitlines():
            rec = json.loads(line)
            if rec["grid"] in results and rec["seed"] < args.sweeps:
                results[rec["grid"]][rec["seed"]] = {k: tuple(v) for k, v in rec["fits"].items()}
    jobs = [(name, s, args.bootstrap, tuple(args.approaches), args.a3_starts)
            for s in range(args.sweeps) for name in args.grids if s not in results[name]]  # fmt: skip
    t0 = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        for name, seed, out in pool.map(one_sweep, jobs):
            results[name][seed] = out
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps({"grid": name, "seed": seed, "fits": out}) + "\n")
    results = {name: list(r.values()) for name, r in results.items()}
    print(f"{args.sweeps} sweeps per grid, {args.bootstrap} resamples each, 80% intervals (10th-90th percentile); "
          f"Approach-3 starts: {args.a3_starts or 4500}; {time.time() - t0:.0f} s on {args.workers} processes "
          f"({len(jobs)} sweeps fitted now)\n")  # fmt: skip
    print("| grid | true a | approach | coverage of the 80% interval | mean width | mean a - true a | sd of a | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.grids:
        keys = sorted({k for out in results[name] for k in out})
        for k in keys:
            rows = [out.get(k) for out in results[name]]
            ok = [r for r in rows if r and r[0] != "failed" and r[1] is not None]
            failed = len(rows) - len(ok)
            a = np.array([r[0] for r in ok])
            lo, hi = np.array([r[1] for r in ok]), np.array([r[2] for r in ok])
            cov = np.sum((lo <= truth[name]) & (truth[name] <= hi)) / len(rows)  # a failed fit is a miss
            print(f"| {name} | {truth[name]:.3f} | {k} | {cov:.0%} | {np.mean(hi - lo):.3f} | "
                  f"{np.mean(a) - truth[name]:+.3f} | {np.std(a):.3f} | {failed} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
