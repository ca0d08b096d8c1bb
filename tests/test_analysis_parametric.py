"""Approach 3 (parametric Huber fit) and the batched L-BFGS behind it."""

import numpy as np
import pytest

from analysis import parametric
from analysis.lbfgs import minimize_batch
from analysis.synthetic import TRUE_PARAMS, isoflop_sweep


@pytest.fixture(scope="module")
def synthetic_points():
    runs, _ = isoflop_sweep(noise=0.005, seed=1)
    return runs["n_params_total"].to_numpy(), runs["tokens"].to_numpy(), runs["final_eval_loss"].to_numpy()


@pytest.fixture(scope="module")
def full_fit(synthetic_points):
    return parametric.fit_parametric(*synthetic_points)


def test_grid_is_the_papers_4500_starts():
    g = parametric.init_grid()
    assert g.shape == (4500, 5)
    a, b, e, alpha, beta = g.T
    assert sorted(set(a)) == sorted(set(b)) == [0, 5, 10, 15, 20, 25]
    assert sorted(set(e)) == [-1, -0.5, 0, 0.5, 1]
    assert sorted(set(alpha)) == sorted(set(beta)) == [0, 0.5, 1, 1.5, 2]


def test_huber_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_n, log_d = rng.uniform(17, 23, (1, 30)), rng.uniform(20, 26, (1, 30))
    log_l = np.log(rng.uniform(2, 4, (1, 30)))
    theta = np.array([[6.0, 6.5, 0.5, 0.35, 0.3], [3.0, 9.0, 0.2, 0.2, 0.4]])
    f, g = parametric.huber_objective(theta, log_n, log_d, log_l, 1.0, delta=0.05)
    eps = 1e-6
    for j in range(5):
        step = np.zeros_like(theta)
        step[:, j] = eps
        fp, _ = parametric.huber_objective(theta + step, log_n, log_d, log_l, 1.0, delta=0.05)
        fm, _ = parametric.huber_objective(theta - step, log_n, log_d, log_l, 1.0, delta=0.05)
        np.testing.assert_allclose(g[:, j], (fp - fm) / (2 * eps), rtol=1e-5, atol=1e-9)


def test_batched_lbfgs_solves_rosenbrock_and_quadratics():
    def vg(x, rows):
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g

    res = minimize_batch(vg, np.array([[-1.2, 1.0], [2.0, -1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(res.x_SP, 1.0, atol=1e-5)
    assert res.converged_S.all()


def test_each_problem_of_a_batch_follows_its_own_path(synthetic_points):
    # One call evaluates a trial point of every unfinished problem, whatever step of its line search
    # each is at; a problem's result must be bit for bit the one it reaches alone, so that a fit or a
    # bootstrap resample does not depend on which other starts or resamples share its batch.
    log_n, log_d, log_l = (np.log(a)[None, :] for a in synthetic_points)
    rng = np.random.default_rng(3)
    starts = parametric.init_grid()[rng.choice(4500, 12, replace=False)]
    w = rng.integers(0, 3, (12, log_n.shape[1])).astype(float)  # bootstrap multiplicities

    batch = minimize_batch(lambda x, rows: parametric.huber_objective(x, log_n, log_d, log_l, w[rows]), starts)
    assert len(set(batch.n_iter_S.tolist())) > 3  # problems finish at different iterations
    for i in range(len(starts)):
        alone = minimize_batch(lambda x, rows: parametric.huber_objective(x, log_n, log_d, log_l, w[i : i + 1]),
                               starts[i : i + 1])  # fmt: skip
        assert np.array_equal(alone.x_SP[0], batch.x_SP[i]), i
        assert (alone.f_S[0], alone.n_iter_S[0], alone.converged_S[0]) == (batch.f_S[i], batch.n_iter_S[i],
                                                                           batch.converged_S[i])  # fmt: skip


def test_recovers_true_parameters_exactly_without_noise():
    runs, _ = isoflop_sweep(noise=0.0, seed=0)
    fit = parametric.fit_parametric(runs["n_params_total"], runs["tokens"], runs["final_eval_loss"],
                                    starts=parametric.init_grid()[::9])  # fmt: skip
    for k, v in TRUE_PARAMS.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-4), k


def test_recovers_true_parameters_with_noise(full_fit):
    p, true = full_fit.params, TRUE_PARAMS
    # 49 runs, 0.5% log-normal loss noise. Tolerances from the spread over seeds 0-5
    # (|alpha error| <= 0.033, |E error| <= 6%, |a error| <= 0.04): exponents 0.05, E 8%.
    assert abs(p["alpha"] - true["alpha"]) < 0.05
    assert abs(p["beta"] - true["beta"]) < 0.05
    assert abs(p["E"] / true["E"] - 1) < 0.08
    a_true = true["beta"] / (true["alpha"] + true["beta"])
    assert abs(parametric.derived(p)["a"] - a_true) < 0.05
    assert full_fit.converged and full_fit.n_starts == 4500
    assert not full_fit.optimum_outside_grid


def test_summing_or_averaging_reaches_the_same_optimum(synthetic_points, full_fit):
    # Besiroglu et al. 2024: averaging the Huber terms made scipy's L-BFGS stop early. Our stopping
    # tests are scale-invariant, so dividing the objective by n must not move the optimum.
    log_n, log_d, log_l = (np.log(a)[None, :] for a in synthetic_points)
    n = log_n.shape[1]
    starts = parametric.init_grid()[::45]  # 100 starts

    def run(scale):
        res = minimize_batch(lambda x, r: tuple(v * scale for v in parametric.huber_objective(x, log_n, log_d, log_l, 1.0)), starts)
        return res.x_SP[np.argmin(res.f_S)], res.f_S.min() / scale

    x_sum, f_sum = run(1.0)
    x_mean, f_mean = run(1.0 / n)
    np.testing.assert_allclose(x_mean, x_sum, atol=2e-3)
    assert f_mean == pytest.approx(f_sum, rel=1e-6)
    assert f_sum >= full_fit.objective - 1e-12  # the full grid is at least as good


def test_compute_optimal_matches_hand_formula():
    p = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    c = 1e21
    n_opt, d_opt = parametric.compute_optimal(p, c)
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert n_opt == pytest.approx(g * (c / 6) ** (0.28 / 0.62))
    assert 6 * n_opt * d_opt == pytest.approx(c)
    # N_opt minimises L(N, C / 6N) along the budget
    ns = np.geomspace(n_opt / 3, n_opt * 3, 2001)
    assert ns[np.argmin(parametric.predict(p, ns, c / (6 * ns)))] == pytest.approx(n_opt, rel=2e-3)
    # another FLOP convention, C = k N^c D: the closed form still minimises L along the budget
    n_k, d_k = parametric.compute_optimal(p, c, (8.0, 1.1))
    assert 8.0 * n_k**1.1 * d_k == pytest.approx(c)
    ns = np.geomspace(n_k / 3, n_k * 3, 2001)
    assert ns[np.argmin(parametric.predict(p, ns, c / (8.0 * ns**1.1)))] == pytest.approx(n_k, rel=2e-3)
    fpt = parametric.fit_flops_per_token([1e8, 1e9, 1e10], [1e9, 1e9, 2e9], [8 * 1e8**1.1 * 1e9, 8 * 1e9**1.1 * 1e9,
                                         8 * 1e10**1.1 * 2e9])  # fmt: skip
    assert fpt["k"] == pytest.approx(8.0) and fpt["c"] == pytest.approx(1.1) and fpt["max_rel_error"] < 1e-9


def test_bootstrap_intervals_cover_truth(synthetic_points, full_fit):
    b = parametric.bootstrap_parametric(*synthetic_points, full_fit, n_bootstrap=60, seed=0)
    assert b["alpha"].shape == (60,) and b["converged"].mean() > 0.95
    for k in ("alpha", "beta"):
        lo, hi = np.percentile(b[k], [1, 99])
        assert lo - 0.01 < TRUE_PARAMS[k] < hi + 0.01
        assert lo <= full_fit.params[k] <= hi


def test_bad_points_are_named():
    with pytest.raises(ValueError, match="positions \\[2\\]"):
        parametric.fit_parametric([1e8, 2e8, np.nan, 4e8, 5e8, 6e8], [1e9] * 6, [3.0] * 6)
    with pytest.raises(ValueError, match="at least 6"):
        parametric.fit_parametric([1e8, 2e8], [1e9, 1e9], [3.0, 2.9])


def test_repeated_points_do_not_count_as_distinct():
    # 8 runs (2 seeds) but only 4 distinct (N, D): the 5 parameters are not identified.
    n = [3e3, 3e3, 1e4, 1e4] * 2
    d = [4e4, 4e4, 1.6e4, 1.6e4, 1.3e5, 1.3e5, 5.4e4, 5.4e4]
    loss = [2.28, 2.28, 2.47, 2.48, 2.12, 2.12, 2.18, 2.19]
    with pytest.raises(ValueError, match="6 distinct \\(N, D\\) points.*got 4 distinct points, 2 distinct N"):
        parametric.fit_parametric(n, d, loss)
    # six distinct points on a 2 x 3 grid still leave (A, alpha) unidentified: 2 distinct N
    with pytest.raises(ValueError, match="2 distinct N"):
        parametric.fit_parametric([1e8] * 3 + [2e8] * 3, [1e9, 2e9, 4e9] * 2, [3.0, 2.9, 2.8, 2.9, 2.8, 2.7])
