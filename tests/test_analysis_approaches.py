"""Approaches 1 and 2: interpolation, FLOP buckets, IsoFLOP grouping and parabolas, recovery of a."""

import numpy as np
import pandas as pd
import pytest

from analysis import approaches as ap
from analysis import isoflop
from analysis import pipeline
from analysis.load import AnalysisError
from analysis.prepare import prepare
from analysis.synthetic import TRUE_PARAMS, isoflop_sweep

A_TRUE = TRUE_PARAMS["beta"] / (TRUE_PARAMS["alpha"] + TRUE_PARAMS["beta"])


def test_loglog_interpolation_is_exact_for_power_laws_and_nan_outside():
    x = np.array([1e2, 1e4, 1e3])  # unsorted on purpose
    y = 5.0 * x**-0.3
    q = np.array([10.0, 1e2, 3e2, 5e3, 1e4, 2e4])
    out = ap.interp_loglog(q, x, y)
    assert np.isnan(out[0]) and np.isnan(out[-1])
    np.testing.assert_allclose(out[1:-1], 5.0 * q[1:-1] ** -0.3, rtol=1e-12)


def _hand_curves():
    # run "small" (N=1): loss = 10 C^-0.1 for C in [1, 1e4]; run "big" (N=10): loss = 20 C^-0.2 for C in [10, 1e6].
    # They cross where C^0.1 = 2, i.e. C = 1024: below it "small" is lower, above it "big".
    c_small, c_big = np.geomspace(1, 1e4, 9), np.geomspace(10, 1e6, 11)
    curves = pd.DataFrame({
        "run": ["small"] * 9 + ["big"] * 11,
        "flops": np.concatenate([c_small, c_big]),
        "loss": np.concatenate([10 * c_small**-0.1, 20 * c_big**-0.2]),
        "tokens": np.concatenate([c_small / 6, c_big / 60]),
    })  # fmt: skip
    runs = pd.DataFrame({"run": ["small", "big"], "n_params": [1.0, 10.0]})
    return runs, curves


def test_envelope_buckets_on_hand_made_curves():
    runs, curves = _hand_curves()
    grid = np.array([1.0, 5.0, 100.0, 1000.0, 1100.0, 5e3, 1e4, 2e4, 1e6])
    loss, tokens = ap.curve_matrix(curves, runs, grid)
    assert np.isnan(loss[1, 0]) and np.isnan(loss[0, -2])  # outside each curve's range
    env = ap.envelope_from_matrix(grid, loss, tokens, runs["n_params"], min_runs=2, drop_edge_sizes=False)
    # buckets spanned by both runs: 100 ... 1e4; winner switches at C = 1024
    np.testing.assert_array_equal(env["flops"], [100.0, 1000.0, 1100.0, 5e3, 1e4])
    np.testing.assert_array_equal(env["n_params"], [1, 1, 10, 10, 10])
    np.testing.assert_allclose(env["loss"], np.where(env["n_params"] == 1, 10 * env["flops"] ** -0.1, 20 * env["flops"] ** -0.2))
    np.testing.assert_allclose(env["tokens"], env["flops"] / (6 * env["n_params"]))
    one = ap.envelope_from_matrix(grid, loss, tokens, runs["n_params"], min_runs=1, drop_edge_sizes=False)
    assert len(one) == len(grid)  # every bucket is covered by at least one run
    # with only two sizes, every winner is an edge size: nothing is left to fit
    assert ap.envelope_from_matrix(grid, loss, tokens, runs["n_params"], min_runs=2).empty


def test_auto_budgets_group_final_flops():
    finals = [0.98e18, 1.0e18, 1.03e18, 1e19, 1.05e19, 0.97e19, 5e19, 1e20, 1e20]
    budgets, tol = ap.auto_budgets(finals)
    np.testing.assert_allclose(budgets, [1.0e18, 1.0e19], rtol=0.02)  # singleton and pair dropped
    assert 0.0128 < tol < 0.05  # 1.05e19 is 0.0196 decades from the cluster mean


def test_isoflop_points_use_final_or_interpolated_losses():
    runs, curves = _hand_curves()
    budgets = np.array([1e3, 1e4])
    loss, tokens = ap.curve_matrix(curves, runs, budgets)
    pts = ap.isoflop_points(budgets, np.array([1e4, 1e6]), np.array([3.9, 1.26]), runs["n_params"].to_numpy(),
                            np.array([1e4 / 6, 1e6 / 60]), loss, tokens, tol_dex=0.01)  # fmt: skip
    got = {(r.budget, r.run_index): (r.kind, r.loss) for r in pts.itertuples()}
    assert got[(1e4, 0)] == ("final", 3.9)  # "small" ends at 1e4: its final loss
    assert got[(1e3, 0)][0] == "interpolated" and got[(1e3, 0)][1] == pytest.approx(10 * 1e3**-0.1)
    assert got[(1e4, 1)][0] == "interpolated" and got[(1e4, 1)][1] == pytest.approx(20 * 1e4**-0.2)
    assert len(pts) == 4


def test_isoflop_interpolation_only_fills_budgets_without_three_final_sizes():
    loss_RK = np.array([[np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan], [2.5, 2.4]])  # run 3 spans both budgets
    tokens_RK = np.full_like(loss_RK, 1e9)
    finals, n = np.array([1e18, 1e18, 1e18, 1e20]), np.array([1e7, 2e7, 4e7, 8e7])
    args = (np.array([1e18, 1e19]), finals, np.full(4, 3.0), n, np.full(4, 1e9), loss_RK, tokens_RK)
    auto = ap.isoflop_points(*args)
    assert auto[auto["budget"] == 1e18]["kind"].tolist() == ["final"] * 3  # 3 sizes end there: no mid-run points
    assert auto[auto["budget"] == 1e19]["kind"].tolist() == ["interpolated"]
    assert (ap.isoflop_points(*args, interpolate="always")["kind"] == "interpolated").sum() == 2
    assert (ap.isoflop_points(*args, interpolate="never")["kind"] == "interpolated").sum() == 0


def test_parabola_minimum_and_rejections():
    n = np.geomspace(1e7, 1e9, 7)
    x = np.log(n)
    x0 = np.log(1e8)
    prof = isoflop.make_profile(1e19, n, 1e19 / (6 * n), 2.0 + 0.05 * (x - x0) ** 2)
    xs, loss = isoflop.locate_minimum(prof, prof.log_loss, "parabola")
    assert np.exp(xs) == pytest.approx(1e8, rel=1e-9) and loss == pytest.approx(2.0)
    assert prof.tokens_at(xs) == pytest.approx(1e19 / 6e8, rel=1e-9) and prof.bracketed
    concave = isoflop.make_profile(1e19, n, n, 2.0 - 0.05 * (x - x0) ** 2)
    assert np.isnan(isoflop.locate_minimum(concave, concave.log_loss, "parabola")[0])
    outside = isoflop.make_profile(1e19, n, n, 2.0 + 0.05 * (x - np.log(1e10)) ** 2)
    assert not outside.bracketed  # lowest loss at the largest size


def test_power_law_fit_is_exact_and_needs_two_budgets():
    c = np.geomspace(1e18, 1e22, 5)
    law = ap.fit_power_law(c, 0.1 * c**0.5)
    assert law.exponent == pytest.approx(0.5) and law.k == pytest.approx(0.1)
    with pytest.raises(AnalysisError, match="2 distinct budgets"):
        ap.fit_power_law([1e18, 1e18], [1e8, 2e8])


@pytest.fixture(scope="module")
def synthetic_points():
    runs, curves = isoflop_sweep(noise=0.003, curve_noise=0.002, seed=3)
    return prepare(runs, curves, flops="6N")


@pytest.mark.parametrize("which", ["1", "2"])
def test_approaches_recover_exponent_on_synthetic_sweep(synthetic_points, which):
    counts = pipeline.resample_counts(len(synthetic_points.points), 30, np.random.default_rng(0))
    fn = pipeline.approach1 if which == "1" else pipeline.approach2
    res = fn(synthetic_points, [1e21, 1e23], counts, [])
    # 49 runs, 0.3% noise on final losses: a within 0.04 of beta/(alpha+beta) = 0.4516
    assert abs(res["a"] - A_TRUE) < 0.04
    assert res["a"] + res["b"] == pytest.approx(1.0, abs=0.02)  # C = 6 N D exactly
    iv = res["intervals"]["a"]
    assert iv["low"] < iv["high"] and iv["n"] == 30
    if which == "2":
        assert iv["low"] <= res["a"] <= iv["high"]
    else:  # a resample's envelope has only ~63% of the curves, so its interval may sit beside the estimate
        assert abs(iv["median"] - res["a"]) < 0.03
    assert len(res["intervals_at_budgets"]) == 2


def test_approach2_without_isoflop_structure_is_an_error(synthetic_points):
    pts = synthetic_points
    single = type(pts)(pts.points.iloc[:7], pts.curves.iloc[:0], pts.flops_convention, pts.n_params_column,
                       pts.kaplan_n_column, pts.loss_column, ())  # fmt: skip
    with pytest.raises(AnalysisError, match="IsoFLOP budgets"):
        pipeline.approach2(single, [1e21], np.zeros((0, 7), int), [])
