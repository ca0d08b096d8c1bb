"""Approach 2 without parabola bias: Akima interpolation, local minima, budgets, bootstrap, Kaplan selection."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import isoflop, kaplan, pipeline
from analysis.bootstrap import resample_counts
from analysis.load import AnalysisError
from analysis.numbers import fmt
from analysis.prepare import prepare
from analysis.synthetic import TRUE_PARAMS, isoflop_sweep, write_sweep

A_TRUE = TRUE_PARAMS["beta"] / (TRUE_PARAMS["alpha"] + TRUE_PARAMS["beta"])
# experiments/quickstart.yaml's grid, and the Approach-3 law of one quickstart run (a = 0.565)
QS_SIZES = {1e11: [3e3, 7e3, 1.5e4, 3.5e4], 3e11: [5e3, 1.2e4, 3e4, 7e4], 1e12: [1e4, 2.5e4, 6e4, 1.5e5]}
QS_LAW = {"E": 1.1202, "A": 27.742, "B": 2265.9, "alpha": 0.50256, "beta": 0.65219}


def _points(runs, curves=None):
    return prepare(runs, curves if curves is not None else runs.iloc[:0][["run"]].assign(step=0, tokens=0.0), flops="6N")


def test_akima_slopes_and_minimum_by_hand():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    # segment slopes -2, -1, 2 extended to -4, -3 | 5, 8; node weights |m_i+1 - m_i|, |m_i-1 - m_i-2|
    y = np.array([3.0, 1.0, 0.0, 2.0])
    np.testing.assert_allclose(isoflop.akima_slopes(x, y), [-2.5, -1.75, -0.25, 3.5])
    # on [2, 3]: p(s) = -0.25 s + 3 s^2 - 0.75 s^3, minimum where p'(s) = -0.25 + 6 s - 2.25 s^2 = 0
    s = (6 - np.sqrt(33.75)) / 4.5
    xm, ym = isoflop.akima_minimum(x, y)
    assert xm == pytest.approx(2 + s, abs=1e-12) and ym == pytest.approx(-0.25 * s + 3 * s**2 - 0.75 * s**3, abs=1e-12)
    # through a zig-zag the end slopes are 2 and the inner ones 0: Hermite cubics, 0.75 and 0.5 at the midpoints
    z = np.array([0.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(isoflop.akima_slopes(x, z), [2.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(isoflop.akima(x, z, [0.5, 1.5, 3.0]), [0.75, 0.5, 1.0])
    # batched rows give the rows' own minima
    rows = np.stack([y, y[::-1]])
    np.testing.assert_allclose(isoflop.akima_minimum(x, rows)[0], [2 + s, 1 - s])
    with pytest.raises(AnalysisError, match=">= 3 strictly increasing"):
        isoflop.akima_slopes([0.0, 1.0], [1.0, 2.0])


def test_akima_matches_scipy():
    interp = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    for n in (3, 5, 8):
        x, y = np.sort(rng.uniform(0, 5, n)), rng.normal(size=n)
        q = np.linspace(x[0], x[-1], 301)
        np.testing.assert_allclose(isoflop.akima(x, y, q), interp.Akima1DInterpolator(x, y)(q), atol=1e-12)


def test_local_minimum_is_exact_on_a_parabola_and_weighted_lines():
    x = np.linspace(0.0, 3.0, 6)
    xs, ys = isoflop.local_minimum(x, 2.0 + 0.3 * (x - 1.1) ** 2)
    assert xs == pytest.approx(1.1, abs=1e-6) and ys == pytest.approx(2.0, abs=1e-9)
    slope, icpt = isoflop.weighted_lines([0.0, 1.0, 2.0, 3.0], [[1.0, 3.0, 5.0, np.nan], [0.0, 0.0, 1.0, 1.0]], [1, 1, 1, 1])
    np.testing.assert_allclose(slope, [2.0, 0.4]) and np.testing.assert_allclose(icpt, [1.0, -0.1])


def test_default_recovers_a_on_spread_profiles_and_parabola_on_same_data():
    # 13 budgets over 4 decades x 9 sizes spread 30x around N_opt as a planner guesses it (20 tokens per
    # parameter, N ~ C^0.5 while the law's a = 0.452), 0.3% noise. Over 30 seeds |a - a_true| < 0.01 in
    # 100% for local (sd 0.003) and parabola (sd 0.003: its exponent is not biased on this grid), 37% for
    # akima (sd 0.025: the interpolant passes through every noisy loss). Seed 0: +0.006, +0.004, -0.016.
    runs, curves = isoflop_sweep(budgets=np.geomspace(1e18, 1e22, 13), n_sizes=9, spread_dex=np.log10(30), noise=0.003,
                                 centre_exponent=0.5, curve_points=2, seed=0)  # fmt: skip
    res = pipeline.approach2(prepare(runs, curves, flops="6N"), [1e21], np.zeros((100, 1)), [])
    assert res["approach2_method"] == "local" and abs(res["a"] - A_TRUE) < 0.01
    assert abs(res["compare"]["parabola"] - A_TRUE) < 0.01 and set(res["compare"]) == {"akima", "parabola"}
    iv = res["intervals"]["a"]
    assert iv["low"] < res["a"] < iv["high"] and iv["high"] - iv["low"] < 0.03


def test_parabola_bias_where_sizes_sit_differently_around_the_minimum():
    # One grid of sizes for every budget (30x around the middle budget's N_opt): the minimum moves across
    # the grid, the whole-profile parabola's bias changes with it and leaks into a; noise-free profiles.
    from analysis.parametric import compute_optimal

    budgets = np.geomspace(1e18, 1e20, 5)
    n_mid = compute_optimal(TRUE_PARAMS, 1e19)[0]
    grid = list(np.geomspace(n_mid / np.sqrt(30), n_mid * np.sqrt(30), 9))
    runs, curves = isoflop_sweep(budgets=budgets, sizes={c: grid for c in budgets}, noise=0.0, curve_points=2)
    got = {m: pipeline.approach2(prepare(runs, curves, flops="6N"), [1e21], np.zeros((0, 1)), [], method=m)["a"]
           for m in isoflop.METHODS}  # fmt: skip
    assert abs(got["akima"] - A_TRUE) < 0.001 and abs(got["local"] - A_TRUE) < 0.002
    assert got["parabola"] - A_TRUE < -0.006  # -0.008


def test_bootstrap_never_loses_a_profile_on_the_quickstart_grid():
    runs, curves = isoflop_sweep(params=QS_LAW, budgets=tuple(QS_SIZES), sizes=QS_SIZES, noise=0.009, curve_points=2, seed=1)
    pts = prepare(runs, curves, flops="6N")
    counts = resample_counts(len(runs), 200, np.random.default_rng(0))
    # what the old global resample of runs did: a budget keeps < 3 of its 4 sizes in ~44% of resamples
    # (1 - 0.648^4 - 4 * 0.648^3 * 0.352), so some budget is lost in ~83% of them
    budget_of = np.repeat(np.arange(3), 4)
    lost = np.array([[np.count_nonzero(c[budget_of == j]) < 3 for j in range(3)] for c in counts])
    assert 0.35 < lost.mean() < 0.52 and lost.any(axis=1).mean() > 0.75
    res = pipeline.approach2(pts, [1e13], counts, [])
    assert res["bootstrap"]["n_budgets"] == [3] * 200  # every resample fits every budget
    assert res["intervals"]["a"]["n"] == 200 and res["intervals"]["a"]["n_failed"] == 0
    assert res["loss_noise"]["df"] == 3 and "chi2" in res["bootstrap_method"]


def test_unbracketed_budget_is_excluded_by_name():
    runs, curves = isoflop_sweep(budgets=(1e18, 1e19, 1e20), n_sizes=5, noise=0.0, curve_points=2)
    last = runs.index[runs["flops_6N"] > 5e19]  # the largest budget's loss falls all the way to its largest size
    runs.loc[last, "final_eval_loss"] = np.linspace(3.0, 2.5, len(last))
    msgs = []
    res = pipeline.approach2(prepare(runs, curves, flops="6N"), [1e21], np.zeros((0, 1)), msgs)
    assert any("budget 1e+20 FLOPs excluded" in m and "largest size" in m and "not bracketed" in m for m in msgs)
    assert [b["fit"] is None for b in res["budgets"]] == [False, False, True]


def test_budgets_group_within_a_hundredth_of_a_decade():
    tight = isoflop.budget_groups([1e18, 1.01e18, 0.99e18, 1e19, 1.02e19, 0.98e19, 5e20])
    assert [g.tight for g in tight] == [True, True] and tight[0].budget == pytest.approx(1e18, rel=0.01)
    loose = isoflop.budget_groups([1e18, 1.2e18, 1.4e18])
    assert not loose[0].tight and loose[0].budget == pytest.approx(1e18) and loose[0].spread_dex == pytest.approx(np.log10(1.4))
    # a loose group: refused (naming its runs) without curves, interpolated from the curves with them
    runs, curves = isoflop_sweep(budgets=(1e18, 1e19), n_sizes=5, noise=0.0, curve_points=12)
    late = runs.index[runs["flops_6N"] > 5e18][[1, 3]]
    runs.loc[late, ["tokens", "flops_6N", "flops_6N+attention"]] *= 1.2  # two runs train 20% longer
    longer = curves["run"].isin(runs.loc[late, "run"])
    curves.loc[longer, ["tokens", "flops_6N", "flops_6N+attention"]] *= 1.2
    msgs = []
    with pytest.raises(AnalysisError, match="needs >= 2 IsoFLOP budgets"):
        pipeline.approach2(prepare(runs, curves.iloc[:0], flops="6N"), [1e21], np.zeros((0, 1)), msgs)
    assert any("refused as a budget" in m and runs.loc[late[0], "run"] in m for m in msgs)
    msgs = []
    res = pipeline.approach2(prepare(runs, curves, flops="6N"), [1e21], np.zeros((0, 1)), msgs)
    assert any("interpolated onto it" in m for m in msgs) and res["points"]["kind"].count("interpolated") >= 2


def _grid_runs(law, n_sizes, tokens):
    rows = []
    for n in n_sizes:
        for d in tokens:
            loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
            rows.append({"run": f"N{n:.0e}_D{d:.0e}", "status": "done", "n_params_total": n, "n_params_nonembed": n,
                         "tokens": d, "flops_6N": 6 * n * d, "final_eval_loss": loss, "steps": 100})  # fmt: skip
    return pd.DataFrame(rows)


def test_kaplan_laws_fit_only_runs_not_limited_by_the_other_variable():
    # N x D grid: at D = 1e14 halving D costs < 0.6% at every size (data no longer limits: L(N) defined);
    # at N = 1e10 halving N costs < 1% only for D = 1e7, 3e7 (0.67%, 0.83%; 1.4% at 1e9): L(D) has 2 points
    law = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.34, "beta": 0.28}
    runs = _grid_runs(law, [1e6, 1e7, 1e8, 5e9, 1e10], [1e7, 3e7, 1e9, 5e13, 1e14])
    pts = _points(runs)
    sel_n, sel_d = kaplan.selection("kaplan_N", pts), kaplan.selection("kaplan_D+E", pts)
    assert kaplan.selection("kaplan_ND", pts) is None
    assert sel_n["n_supported"] == 5 and set(runs.loc[sel_n["use"], "tokens"]) == {1e14}
    d_used = sorted(runs.loc[sel_d["use"], "tokens"])
    assert d_used == [1e7, 3e7] and set(runs.loc[sel_d["use"], "n_params_total"]) == {1e10}
    msgs, unsupported = [], {}
    out = pipeline.fit_laws(pts, ("kaplan_N", "kaplan_D"), np.zeros((0, len(runs))), msgs, unsupported=unsupported)
    assert sorted(out["kaplan_N"]["data"]["N"]) == [1e6, 1e7, 1e8, 5e9, 1e10] and "5 of 5 values of N" in out["kaplan_N"]["fitted_on"]
    assert "kaplan_D" in unsupported and "2 of 5 values of D" in unsupported["kaplan_D"]["reason"]
    assert any("law kaplan_D not fitted" in m for m in msgs)


def test_one_number_format_for_report_and_legends():
    from analysis import figures, report

    assert figures.fmt is report._g is fmt
    assert fmt(1.93e-28, 4) == "0" and fmt(0.035081, 4) == "0.03508" and fmt(None) == "—" and fmt(float("nan")) == "—"


def test_cli_approach2_flag(tmp_path):
    runs, curves = isoflop_sweep(budgets=(1e18, 1e19, 1e20), n_sizes=5, noise=0.003, seed=4, curve_points=2)
    sweep = write_sweep(tmp_path / "sweep", runs, curves)
    cmd = [sys.executable, "-m", "sweeps.cli", "fit", str(sweep), "--approach", "2", "--law", "none", "--bootstrap", "0",
           "--no-figures", "--no-extrapolation", "--quiet", "--approach2", "parabola"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "approach 2: N_opt ~ C^" in out and "(parabola; local: " in out and "akima: " in out
    report = (sweep / "report.md").read_text()
    assert "with `parabola` (`--approach2`)" in report and "whole IsoFLOP profile (Hoffmann et al. 2022)" in report
    bad = subprocess.run(cmd[:-1] + ["cubic"], capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice: 'cubic'" in bad.stderr
    from sweeps import spec

    assert spec._FIT_OPTION_CHECKS["approach2"]("akima", "fit.options.approach2") == "akima"
    with pytest.raises(spec.ConfigError, match="choose one of local, akima, parabola"):
        spec._FIT_OPTION_CHECKS["approach2"]("cubic", "fit.options.approach2")
    helptext = subprocess.run([sys.executable, "-m", "sweeps.cli", "fit", "-h"], capture_output=True, text=True).stdout
    assert "--approach2 {" + ",".join(isoflop.METHODS) + "}" in helptext  # the CLI's literal choices are the methods
