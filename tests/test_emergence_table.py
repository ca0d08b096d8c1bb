"""The emergence rule on hand-made series, the loss-threshold fit, and the table over seeds."""

import numpy as np
import pandas as pd
import pytest

from analysis.emergence_table import (
    emergence_scale,
    emergence_table,
    fit_loss_threshold,
    ramp,
    rule_text,
)


def test_monotone_series_emerges_at_first_size_above_margin():
    r = emergence_scale([1e3, 1e4, 1e5, 1e6], [0.0, 0.05, 0.3, 0.8], baseline=0.0, margin=0.1)
    assert (r["status"], r["at"], r["last_below"], r["first_above"], r["threshold"]) == ("emerges", 1e5, 1e4, 1e5, 0.1)
    shuffled = emergence_scale([1e5, 1e3, 1e6, 1e4], [0.3, 0.0, 0.8, 0.05], baseline=0.0, margin=0.1)
    assert shuffled["at"] == 1e5  # sorted by scale first


def test_non_monotone_series_must_stay_above():
    r = emergence_scale([1, 2, 3, 4, 5], [0.0, 0.3, 0.05, 0.5, 0.6], baseline=0.0, margin=0.1)
    assert (r["status"], r["at"], r["last_below"], r["first_above"]) == ("emerges", 4.0, 3.0, 2.0)
    dips_at_end = emergence_scale([1, 2, 3], [0.0, 0.5, 0.05], baseline=0.0, margin=0.1)
    assert (dips_at_end["status"], dips_at_end["at"], dips_at_end["first_above"]) == ("not above", None, 2.0)


def test_edge_cases_of_the_rule():
    assert emergence_scale([1, 2], [0.5, 0.6], baseline=0.25, margin=0.1)["status"] == "above at every scale"
    assert emergence_scale([1, 2], [0.3, 0.34], baseline=0.25, margin=0.1)["status"] == "not above"  # within margin
    assert emergence_scale([1, 2], [0.3, 0.4], baseline=float("nan"))["status"] == "no baseline"
    brier = emergence_scale([1, 2, 3, 4], [0.5, 0.45, 0.3, 0.1], baseline=0.5, margin=0.1, higher=False)
    assert (brier["status"], brier["at"], brier["threshold"]) == ("emerges", 3.0, 0.4)
    assert "baseline + 0.1" in rule_text(0.1) and ">= 0.5" in rule_text(0.1, 0.5)


def test_emergence_table_uses_seed_means_of_final_evaluations():
    rows = []
    for n, vals in ((1e3, (0.0, 0.0)), (1e4, (0.0, 0.3)), (1e5, (0.6, 0.9))):  # seed means 0, 0.15, 0.75
        for seed, v in enumerate(vals):
            for step, final, value in ((50, False, 0.0), (100, True, v)):
                rows.append({"source": "s", "run": f"n{n:g}_s{seed}", "model": f"N={n:g}", "n_params": n, "flops": 6 * n * 20 * n,
                             "tokens": 20 * n, "eval_loss": 3.0, "seed": seed, "task": "t", "step": step, "final": final,
                             "metric": "exact_match", "value": value, "ci_lo": 0.0, "ci_hi": 1.0, "n_items": 10,
                             "baseline": 0.0})  # fmt: skip
    table = emergence_table(pd.DataFrame(rows), margin=0.2)
    assert len(table) == 1
    e = table[0]
    assert e["n_params"]["at"] == 1e5 and e["flops"]["at"] == 6 * 1e5 * 20 * 1e5  # 0.15 < 0.2 at N=1e4
    assert [v["mean"] for v in e["values"]] == pytest.approx([0.0, 0.15, 0.75])
    assert [v["frac_solved"] for v in e["values"]] == pytest.approx([0.0, 0.0, 1.0])
    assert emergence_table(pd.DataFrame(rows), margin=0.1)[0]["n_params"]["at"] == 1e4


def test_loss_threshold_recovers_a_known_ramp():
    loss = np.linspace(2.0, 4.0, 41)
    value = ramp(loss, threshold=3.2, saturation=2.4, level=0.1, rise=0.9)
    value += np.random.default_rng(0).normal(0, 0.01, loss.size)
    fit = fit_loss_threshold(loss, value)
    assert fit["threshold"] == pytest.approx(3.2, abs=0.1) and fit["saturation"] == pytest.approx(2.4, abs=0.1)
    assert fit["level"] == pytest.approx(0.1, abs=0.02) and fit["rise"] == pytest.approx(0.9, abs=0.05)
    assert fit["r2"] > 0.99 and fit["n_points"] == 41
    down = fit_loss_threshold(loss, 1 - value, higher=False)  # lower-is-better metric: it falls below the threshold
    assert down["threshold"] == pytest.approx(3.2, abs=0.1) and down["rise"] < 0


def test_loss_threshold_absent_when_flat_or_too_few_points():
    assert fit_loss_threshold([3.0, 2.9, 2.8, 2.7, 2.6], [0.5] * 5)["threshold"] is None
    assert fit_loss_threshold([3.0, 2.0], [0.0, 1.0])["threshold"] is None
    assert fit_loss_threshold(np.linspace(2, 4, 20), np.linspace(0, 1, 20))["threshold"] is None  # rises with loss
