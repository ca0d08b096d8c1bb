"""Emergence metrics against hand computations; bootstrap coverage; mirage predictions on independent tokens."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.emergence_metrics import (
    brier_score,
    chance_baselines,
    item_scores,
    levenshtein,
    mirage_predictions,
    position_accuracy,
    score_records,
    seed_summary,
)
from analysis.emergence_synthetic import token_records


def _rec(target, output, correct, lps=None, **extra):
    lps = lps if lps is not None else [-0.5] * len(target)
    return {"task": "t", "item": 0, "shots": 0, "prompt": "Q", "target": "".join(map(str, target)),
            "output": "".join(map(str, output)), "target_tokens": target, "output_tokens": output,
            "token_correct": correct, "token_logprobs": lps, "target_logprob": sum(lps)} | extra  # fmt: skip


RECORDS = [
    _rec([1, 2, 3], [1, 2, 3], [True, True, True], [-0.1, -0.2, -0.3]),
    _rec([1, 2, 3, 4], [1, 5, 3], [True, False, True, False], [-0.1, -2.0, -0.1, -3.0]),
]


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], [1, 2]) == 2
    assert levenshtein([1, 2, 3], [1, 2, 3]) == 0
    assert levenshtein([1, 5, 3], [1, 2, 3, 4]) == 2  # one substitution, one insertion


def test_item_scores_by_hand():
    s = item_scores(RECORDS)
    assert s["exact_match"].tolist() == [1.0, 0.0]
    assert s["token_accuracy"].tolist() == [1.0, 0.5]
    assert s["edit_distance"].tolist() == [0.0, 2.0]
    assert s["edit_distance_norm"].tolist() == [0.0, 0.5]
    assert s["target_logprob"].tolist() == pytest.approx([-0.6, -5.2])
    assert s["mc_accuracy"].isna().all() and s["brier"].isna().all()


def test_exact_match_strips_whitespace():
    rec = _rec([1], [1], [True]) | {"target": " 42", "output": "42\n"}
    assert item_scores([rec])["exact_match"].iloc[0] == 1.0


def test_multiple_choice_accuracy_and_brier_by_hand():
    assert brier_score(np.log([0.2, 0.5, 0.3]), 1) == pytest.approx(0.2**2 + 0.5**2 + 0.3**2)
    p0 = 1 / (1 + math.e)  # softmax of unnormalised log-probs [0, 1]
    assert brier_score([0.0, 1.0], 0) == pytest.approx((1 - p0) ** 2 + (1 - p0) ** 2)
    recs = [_rec([1], [1], [True], choices=["a", "b", "c"], choice_logprobs=np.log([0.2, 0.5, 0.3]).tolist(), answer_index=1),
            _rec([1], [2], [False], choices=["a", "b"], choice_logprobs=[0.0, 1.0], answer_index=0)]  # fmt: skip
    s = item_scores(recs)
    assert s["mc_accuracy"].tolist() == [1.0, 0.0]
    assert chance_baselines(4) == {"mc_accuracy": 0.25, "brier": 0.75}
    assert brier_score([0.0] * 4, 2) == pytest.approx(chance_baselines(4)["brier"])


def test_score_records_values_positions_and_counts():
    out = score_records(RECORDS, n_bootstrap=200, seed=1)
    assert out["exact_match"]["value"] == 0.5 and out["exact_match"]["n_items"] == 2
    assert out["token_accuracy"]["value"] == 0.75
    assert [out[f"token_accuracy_pos{j}"]["value"] for j in range(4)] == [1.0, 0.5, 1.0, 0.0]
    assert out["token_accuracy_pos3"]["n_items"] == 1
    assert "mc_accuracy" not in out  # no item has choices
    assert 0.0 <= out["exact_match"]["ci_lo"] <= 0.5 <= out["exact_match"]["ci_hi"] <= 1.0
    acc, n = position_accuracy(RECORDS)
    assert acc.tolist() == [1.0, 0.5, 1.0, 0.0] and n.tolist() == [2, 2, 2, 1]
    no_ci = score_records(RECORDS, n_bootstrap=0)
    assert math.isnan(no_ci["exact_match"]["ci_lo"]) and no_ci["exact_match"]["value"] == 0.5
    assert score_records(RECORDS, n_bootstrap=50, seed=3) == score_records(RECORDS, n_bootstrap=50, seed=3)


def test_mirage_predictions_by_hand():
    m = np.array([[1, 1, 1], [1, 0, 1]], float)
    pred = mirage_predictions(m)
    assert pred["pred_em_pL"] == pytest.approx((5 / 6) ** 3)
    assert pred["pred_em_positions"] == pytest.approx(1 * 0.5 * 1)
    ragged = np.array([[1, 1, np.nan], [0, 1, 1]], float)  # target lengths 2 and 3
    pred = mirage_predictions(ragged)
    assert pred["pred_em_pL"] == pytest.approx((0.8**2 + 0.8**3) / 2)
    assert pred["pred_em_positions"] == pytest.approx((0.5 * 1 + 0.5 * 1 * 1) / 2)


def test_bootstrap_interval_covers_the_truth():
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(20):
        recs = token_records("t", 200, 1, 0.3, rng)
        ci = score_records(recs, n_bootstrap=300, seed=k)["exact_match"]
        covered += ci["ci_lo"] <= 0.3 <= ci["ci_hi"]
    assert covered >= 16  # 95% intervals: 19 of 20 expected


def test_predictions_match_exact_match_when_tokens_are_independent():
    recs = token_records("t", 3000, 5, 0.7, np.random.default_rng(1))
    out = score_records(recs, n_bootstrap=0)
    sd = math.sqrt(0.7**5 * (1 - 0.7**5) / 3000)
    assert out["exact_match"]["value"] == pytest.approx(0.7**5, abs=4 * sd)
    for k in ("pred_em_pL", "pred_em_positions"):
        assert out[k]["value"] == pytest.approx(out["exact_match"]["value"], abs=4 * sd)
    assert out["token_accuracy"]["value"] == pytest.approx(0.7, abs=0.02)


def test_seed_summary_mean_spread_and_solved_fraction():
    rows = [{"source": "s", "model": "m", "task": "t", "step": 100, "metric": metric, "value": v, "n_params": 1e4,
             "flops": 1e9, "tokens": 1e5, "eval_loss": 3.0, "baseline": 0.0, "ci_lo": 0, "ci_hi": 1, "n_items": 10}
            for metric, vals in (("exact_match", (0.2, 0.6, 0.9)), ("token_accuracy", (0.5, 0.8, 0.95))) for v in vals]  # fmt: skip
    s = seed_summary(pd.DataFrame(rows), solve_threshold=0.5).set_index("metric")
    assert s.loc["exact_match", "mean"] == pytest.approx(17 / 30)
    assert s.loc["exact_match", "std"] == pytest.approx(np.std([0.2, 0.6, 0.9]))
    assert (s.loc["exact_match", "min"], s.loc["exact_match", "max"], s.loc["exact_match", "n_seeds"]) == (0.2, 0.9, 3)
    assert s.loc["exact_match", "frac_solved"] == pytest.approx(2 / 3)
    assert s.loc["token_accuracy", "frac_solved"] == pytest.approx(2 / 3)  # attached to every metric of the group
