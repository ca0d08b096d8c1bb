"""Time chinchax's Approach-3 fit against a plain per-start scipy L-BFGS loop on the same points.

    python benchmarks/fit_speed.py                       # 245 synthetic points (known parameters)
    python benchmarks/fit_speed.py --epoch-csv PATH      # Besiroglu et al. 2024 points (Hoffmann Fig. 4)

With --epoch-csv (columns `Model Size`, `Training FLOP`, `loss`), D = C / (6 N) and the five
highest-loss points are dropped, as in Besiroglu et al. 2024; the expected Approach-3 optimum
(summed Huber terms, 4,500 starts) is E 1.817, A 478, B 2143, alpha 0.347, beta 0.367.

The scipy baseline is what a user would write: scipy.optimize.minimize(method="L-BFGS-B") per
start on sum(scipy.special.huber(1e-3, logsumexp(...) - log L)) with finite-difference gradients.
Running it from all 4,500 starts takes many minutes on a laptop, so by default it runs from a
random subset of starts and its time is extrapolated to 4,500 (the table says so); pass
--scipy-starts 4500 for the full loop. It also shows what averaging instead of summing the Huber
terms does to scipy's L-BFGS (it stops early) and to ours (scale-invariant stopping: same optimum).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import parametric  # noqa: E402
from analysis.lbfgs import minimize_batch  # noqa: E402
from analysis.synthetic import TRUE_PARAMS, isoflop_sweep  # noqa: E402

EPOCH_EXPECTED = {"E": 1.817, "A": 478.0, "B": 2143.0, "alpha": 0.347, "beta": 0.367}


def load_points(epoch_csv):
    if epoch_csv:
        import pandas as pd

        df = pd.read_csv(epoch_csv)
        df = df.sort_values("loss").iloc[:-5]  # drop the five highest-loss points
        n, c, loss = (df[k].to_numpy(float) for k in ("Model Size", "Training FLOP", "loss"))
        return n, c / (6 * n), loss, f"Epoch AI points from {epoch_csv} ({len(n)} after dropping 5)", EPOCH_EXPECTED
    runs, _ = isoflop_sweep(budgets=np.geomspace(6e18, 3e21, 7), n_sizes=35, spread_dex=1.2, noise=0.01, seed=0)
    n, d, loss = (runs[k].to_numpy(float) for k in ("n_params_total", "tokens", "final_eval_loss"))
    return n, d, loss, f"synthetic: {len(n)} points, 1% noise, true {TRUE_PARAMS}", TRUE_PARAMS


def plain_objective(log_n, log_d, log_l, scale=1.0):
    def f(x):
        a, b, e, alpha, beta = x
        pred = logsumexp([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=0)
        return scale * np.sum(huber(1e-3, pred - log_l))

    return f


def scipy_loop(fun, starts):
    best = None
    for x0 in starts:
        res = minimize(fun, x0, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    return best


def fmt_params(p):
    d = parametric.derived(p)
    return (f"E {p['E']:.4f}  A {p['A']:.1f}  B {p['B']:.1f}  alpha {p['alpha']:.4f}  beta {p['beta']:.4f}  "
            f"a {float(d['a']):.4f}")  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epoch-csv", type=Path, default=None, help="svg_extracted_data.csv of Besiroglu et al. 2024")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of our fits (median reported)")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--scipy-starts", type=int, default=200, help="scipy loop starts (random subset; 4500 = all)")
    ap.add_argument("--scipy-bootstrap", type=int, default=10,
                    help="resamples timed for the scipy warm-start bootstrap (0: skip that row)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # Checked before the minute of fitting, not after it.
    for flag, value, low in (("--repeats", args.repeats, 1), ("--n-bootstrap", args.n_bootstrap, 1),
                             ("--scipy-starts", args.scipy_starts, 1), ("--scipy-bootstrap", args.scipy_bootstrap, 0),
                             ("--seed", args.seed, 0)):  # fmt: skip
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    if args.epoch_csv is not None and not args.epoch_csv.is_file():
        ap.error(f"--epoch-csv {args.epoch_csv}: no such file")

    n, d, loss, label, expected = load_points(args.epoch_csv)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = parametric.init_grid()
    rng = np.random.default_rng(args.seed)
    print(f"data: {label}")

    ours, t_ours = None, []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = parametric.fit_parametric(n, d, loss)
        t_ours.append(time.perf_counter() - t0)
    t_boot = []
    for r in range(max(1, args.repeats - 1)):
        t0 = time.perf_counter()
        boot = parametric.bootstrap_parametric(n, d, loss, ours, n_bootstrap=args.n_bootstrap, seed=args.seed + r)
        t_boot.append(time.perf_counter() - t0)

    k = min(args.scipy_starts, len(grid))
    idx = np.arange(len(grid)) if k == len(grid) else rng.choice(len(grid), k, replace=False)
    fun = plain_objective(log_n, log_d, log_l)
    t0 = time.perf_counter()
    sp = scipy_loop(fun, grid[idx])
    t_sp_k = time.perf_counter() - t0
    t_sp_full = t_sp_k * len(grid) / k

    # scipy bootstrap with the same warm starts per resample as ours, timed on a few resamples
    starts = np.concatenate([ours.local_optima[:3], grid[rng.choice(len(grid), 3, replace=False)]])
    m = len(n)
    t0 = time.perf_counter()
    for _ in range(args.scipy_bootstrap):
        sel = rng.integers(0, m, m)
        scipy_loop(plain_objective(log_n[sel], log_d[sel], log_l[sel]), starts)
    t_sp_boot = (time.perf_counter() - t0) / args.scipy_bootstrap * args.n_bootstrap if args.scipy_bootstrap else None

    # averaging instead of summing: scipy stops early; ours does not care about the scale
    sp_mean = scipy_loop(plain_objective(log_n, log_d, log_l, 1.0 / m), grid[idx])
    ln, ldd, ll = log_n[None], log_d[None], log_l[None]
    mean_ours = minimize_batch(
        lambda x, r: tuple(v / m for v in parametric.huber_objective(x, ln, ldd, ll, 1.0)), grid
    )  # fmt: skip
    best_mean = mean_ours.x_SP[np.argmin(mean_ours.f_S)]

    med = float(np.median(t_ours))
    extrap = "" if k == len(grid) else f" (timed {k} random starts, x{len(grid) / k:.1f})"
    print()
    print("| fit | starts | time (s) | ratio scipy / ours |")
    print("| --- | --- | --- | --- |")
    print(f"| chinchax batched L-BFGS, full grid (median of {len(t_ours)}) | 4500 | {med:.2f} | |")
    print(f"| scipy L-BFGS-B per start{extrap} | 4500 | {t_sp_full:.1f} | {t_sp_full / med:.1f}x |")
    bmed = float(np.median(t_boot))
    print(f"| chinchax bootstrap, {args.n_bootstrap} refits (median of {len(t_boot)}) | 6 warm per refit | {bmed:.2f} | |")
    if t_sp_boot is not None:  # --scipy-bootstrap 0 skips this row
        print(f"| scipy bootstrap, same 6 warm starts (timed {args.scipy_bootstrap} refits) | 6 warm per refit | "
              f"{t_sp_boot:.1f} | {t_sp_boot / bmed:.1f}x |")  # fmt: skip
    print(f"| scipy bootstrap, full grid per refit (extrapolated) | 4500 per refit | {t_sp_full * args.n_bootstrap:.0f} | "
          f"{t_sp_full * args.n_bootstrap / bmed:.0f}x |")  # fmt: skip
    print()
    print(f"chinchax optimum (sum):   {fmt_params(ours.params)}  objective {ours.objective:.8g}  "
          f"converged {ours.converged} ({ours.n_converged}/4500 starts converged, {ours.n_at_optimum} at the optimum; "
          f"all on the grid edge: {ours.start_on_grid_edge})")  # fmt: skip
    print(f"scipy optimum (sum):      {fmt_params(parametric.params_from_theta(sp.x))}  objective {sp.fun:.8g}"
          f"  ({k} starts)")  # fmt: skip
    print(f"{'expected:' if args.epoch_csv else 'true:':<26}{fmt_params(expected)}")
    print(f"scipy optimum (MEAN):     {fmt_params(parametric.params_from_theta(sp_mean.x))}  "
          f"summed objective there {fun(sp_mean.x):.8g}  <- averaging makes L-BFGS-B stop early")  # fmt: skip
    print(f"chinchax optimum (MEAN):  {fmt_params(parametric.params_from_theta(best_mean))}  (scale-invariant stopping)")
    iv = {q: np.percentile(boot[q], [10, 90]) for q in ("alpha", "beta")}
    a_b = parametric.derived(boot)["a"]
    print(f"bootstrap 10-90%: alpha {iv['alpha'].round(3)}, beta {iv['beta'].round(3)}, a {np.percentile(a_b, [10, 90]).round(3)}; "
          f"converged {boot['converged'].mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
