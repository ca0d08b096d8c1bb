"""Kaplan and saturating laws: formulas, round trips, recovery from noisy synthetic data, bad input."""

import numpy as np
import pytest

from analysis import laws
from analysis.load import AnalysisError

RNG = np.random.default_rng(0)
NOISE = 0.003  # log-normal noise on the loss


def _noisy(y):
    return y * np.exp(NOISE * RNG.standard_normal(np.shape(y)))


CASES = [
    # (law, true params, inputs, relative tolerance on scale constants, absolute on exponents)
    (laws.kaplan_n(), {"N_c": 8.8e13, "alpha_N": 0.076}, {"N": np.geomspace(1e6, 1e10, 20)}, 0.5, 0.005),
    (laws.kaplan_n(True), {"N_c": 1e10, "alpha_N": 0.3, "E": 1.7}, {"N": np.geomspace(1e6, 1e10, 30)}, 0.3, 0.03),
    (laws.kaplan_d(), {"D_c": 5.4e13, "alpha_D": 0.095}, {"D": np.geomspace(1e8, 1e11, 20)}, 0.5, 0.005),
    (laws.kaplan_c(), {"C_c": 1.6e28, "alpha_C": 0.05}, {"C": np.geomspace(1e17, 1e21, 20)}, 0.8, 0.005),
    (laws.saturating_c(), {"C_0": 1e18, "gamma": 0.2, "E": 1.8}, {"C": np.geomspace(1e15, 1e21, 30)}, 0.3, 0.02),
]


@pytest.mark.parametrize("law,true,inputs,rtol,atol", CASES, ids=[c[0].name for c in CASES])
def test_single_input_laws_recover_parameters(law, true, inputs, rtol, atol):
    fitted = law.fit(_noisy(law(true, **inputs)), **inputs)
    for k, v in true.items():
        if k.startswith(("alpha", "gamma")):
            assert abs(fitted.params[k] - v) < atol, k
        else:
            assert abs(fitted.params[k] / v - 1) < rtol, k
    assert fitted.rmse_log < 2 * NOISE


def _grid_nd():
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 8), np.geomspace(1e8, 1e11, 8))
    return n.ravel(), d.ravel()


def test_kaplan_nd_recovers_exponents():
    n, d = _grid_nd()
    law = laws.kaplan_nd()
    true = {"N_c": 6.4e13, "alpha_N": 0.076, "D_c": 1.8e13, "alpha_D": 0.103}  # Kaplan et al. Table 2
    fitted = law.fit(_noisy(law(true, N=n, D=d)), N=n, D=d)
    assert abs(fitted.params["alpha_N"] - 0.076) < 0.01
    assert abs(fitted.params["alpha_D"] - 0.103) < 0.01


def test_kaplan_ns_recovers_exponents():
    n, s = np.meshgrid(np.geomspace(1e6, 1e9, 8), np.geomspace(1e3, 1e5, 10))
    law = laws.kaplan_ns()
    true = {"N_c": 6.5e13, "alpha_N": 0.077, "S_c": 2.1e3, "alpha_S": 0.76}  # Kaplan et al. Table 2
    fitted = law.fit(_noisy(law(true, N=n.ravel(), S=s.ravel())), N=n.ravel(), S=s.ravel())
    assert abs(fitted.params["alpha_N"] - 0.077) < 0.01
    assert abs(fitted.params["alpha_S"] - 0.76) < 0.05


def test_chinchilla_law_formula_and_recovery():
    law = laws.chinchilla()
    p = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    assert law(p, N=1e9, D=2e10) == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28)
    n, d = _grid_nd()
    fitted = law.fit(law(p, N=n, D=d), N=n, D=d)
    assert fitted.params["alpha"] == pytest.approx(0.34, abs=1e-3)
    assert fitted.params["E"] == pytest.approx(1.69, rel=1e-3)


def test_hand_values_and_metadata():
    assert laws.kaplan_n()({"N_c": 100.0, "alpha_N": 0.5}, N=25.0) == pytest.approx(2.0)
    nd = laws.kaplan_nd()({"N_c": 1.0, "alpha_N": 1.0, "D_c": 1.0, "alpha_D": 1.0}, N=2.0, D=4.0)
    assert nd == pytest.approx(0.75)  # (1/2)^1 + 1/4
    for name, make in laws.LAWS.items():
        law = make()
        assert law.formula.startswith("L(") and ("et al." in law.citation), name
        p = {k: 1.5 for k in law.param_names}
        assert law.to_params(law.from_params(p)) == pytest.approx(p)


def test_bad_input_errors():
    law = laws.kaplan_n()
    with pytest.raises(AnalysisError, match="needs more than 2 points"):
        law.fit([3.0, 2.9], N=[1e6, 1e7])
    with pytest.raises(AnalysisError, match=r"N must be finite and > 0; bad at positions \[1\]"):
        law.fit([3.0, 2.9, 2.8], N=[1e6, -1.0, 1e8])
    with pytest.raises(AnalysisError, match="at least 2 distinct values of S"):
        laws.kaplan_ns().fit([3.0] * 6, N=[1e6, 1e7] * 3, S=[100.0] * 6)
    with pytest.raises(AnalysisError, match=r"loss must be finite"):
        law.fit([3.0, np.nan, 2.8], N=[1e6, 1e7, 1e8])
