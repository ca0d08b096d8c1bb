"""Scoring of evaluation records without JAX: per-item metrics, bootstrap intervals over items,
the mirage predictions (Schaeffer et al. 2023) and aggregation over seeds.

A record is one evaluated item (see ``analysis.emergence_load``): target and output text, the
target and output token ids, teacher-forced per-token correctness and log-probabilities, and
optionally the log-probabilities of multiple-choice answers. Every metric here is recomputed
from those fields, so the same outputs can be scored sharply (exact match) and smoothly
(per-token accuracy, edit distance, Brier score).

Units: accuracies and exact match are fractions in [0, 1]; edit distance in tokens (and per
target token when normalised); log-probabilities in nats (natural log).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.bootstrap import interval, resample_counts

# Item metrics, in report order. Higher is better except those in LOWER_IS_BETTER.
EXACT_MATCH = "exact_match"
METRICS = (
    EXACT_MATCH,  # output == target after stripping whitespace
    "token_accuracy",  # mean over target positions of teacher-forced argmax correctness
    "edit_distance",  # Levenshtein distance between output and target token ids (tokens)
    "edit_distance_norm",  # the same divided by the target length (per target token)
    "target_logprob",  # log p(target | prompt), teacher-forced, nats
    "mc_accuracy",  # argmax of choice log-probs == answer_index (items with choices only)
    "brier",  # sum_k (softmax(choice log-probs)_k - onehot_k)^2 (items with choices only)
)
# Mirage predictions of exact match from per-token accuracy (Schaeffer et al. 2023, Eq. 1):
PRED_PL = "pred_em_pL"  # mean over items of p^L_i, p = mean per-token accuracy, L_i = target length
PRED_POSITIONS = "pred_em_positions"  # mean over items of prod_j acc_j over the item's positions j
PREDICTIONS = (PRED_PL, PRED_POSITIONS)
POSITION_PREFIX = "token_accuracy_pos"  # token_accuracy_pos0, ...: accuracy at target position j
LOWER_IS_BETTER = frozenset({"edit_distance", "edit_distance_norm", "brier", "loss", "perplexity"})

# Two-sided 95% percentile interval over items; scaling-law fits use analysis.bootstrap's
# 10/90 (Chinchilla's choice for parameter estimates), but accuracy curves are read as 95%.
CI_PERCENTILES = (2.5, 97.5)
# A seed "solves" a task when its exact match reaches this fraction of items.
SOLVE_THRESHOLD = 0.5


def higher_is_better(metric: str) -> bool:
    """False for error-like metrics (edit distance, Brier score, loss), True otherwise."""
    return metric not in LOWER_IS_BETTER


def levenshtein(a, b) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def brier_score(choice_logprobs, answer_index: int) -> float:
    """Multi-class Brier score of softmax(choice_logprobs) against the one-hot answer (0 best, 2 worst)."""
    lp = np.asarray(choice_logprobs, float)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    onehot = np.zeros_like(p)
    onehot[int(answer_index)] = 1.0
    return float(np.sum((p - onehot) ** 2))


def chance_baselines(n_choices: int) -> dict:
    """Random-guess baselines of a K-way multiple choice: accuracy 1/K, Brier (K-1)/K (uniform guess)."""
    k = int(n_choices)
    return {"mc_accuracy": 1.0 / k, "brier": (k - 1.0) / k}


def item_scores(records: list[dict]) -> pd.DataFrame:
    """One row per record, one column per item metric (NaN where it does not apply, e.g. no choices)."""
    rows = []
    for r in records:
        target, output = list(r["target_tokens"]), list(r.get("output_tokens") or [])
        correct = np.asarray(r["token_correct"], float)
        dist = levenshtein(output, target)
        row = {
            EXACT_MATCH: float(str(r["output"]).strip() == str(r["target"]).strip()),
            "token_accuracy": correct.mean() if correct.size else np.nan,
            "edit_distance": float(dist),
            "edit_distance_norm": dist / len(target) if target else np.nan,
            "target_logprob": float(r["target_logprob"]),
            "mc_accuracy": np.nan,
            "brier": np.nan,
        }
        if r.get("choices") is not None and r.get("choice_logprobs") is not None and r.get("answer_index") is not None:
            row["mc_accuracy"] = float(int(np.argmax(r["choice_logprobs"])) == int(r["answer_index"]))
            row["brier"] = brier_score(r["choice_logprobs"], r["answer_index"])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(METRICS))


def correctness_matrix(records: list[dict]) -> np.ndarray:
    """[items, max target length] teacher-forced correctness, NaN past each item's target length."""
    width = max((len(r["token_correct"]) for r in records), default=0)
    out = np.full((len(records), width), np.nan)
    for i, r in enumerate(records):
        out[i, : len(r["token_correct"])] = np.asarray(r["token_correct"], float)
    return out


def position_accuracy(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy at each target position, number of items with that position)."""
    m = correctness_matrix(records)
    n = np.sum(np.isfinite(m), axis=0)
    with np.errstate(invalid="ignore"):
        return np.nanmean(m, axis=0) if m.size else np.zeros(0), n


def _mirage_weighted(correct: np.ndarray, weights: np.ndarray) -> dict:
    """Both predictions for each row of item weights ([resamples, items]); see mirage_predictions."""
    valid = np.isfinite(correct)
    filled = np.where(valid, correct, 0.0)
    lengths = valid.sum(axis=1)
    w = weights.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (w @ filled.sum(axis=1)) / (w @ lengths)  # pooled per-token accuracy, [resamples]
        acc = (w @ filled) / (w @ valid)  # accuracy at each position, [resamples, positions]
        log_acc = np.log(np.where(acc > 0, acc, 1e-300))
        prefix = np.exp(np.cumsum(log_acc, axis=1))  # prod_{j<=k} acc_j
        per_item = np.where(lengths > 0, prefix[:, np.maximum(lengths - 1, 0)], 1.0)
        tot = w.sum(axis=1)
        pl = (w * p[:, None] ** lengths[None, :]).sum(axis=1) / tot
        pos = (w * per_item).sum(axis=1) / tot
    return {PRED_PL: pl, PRED_POSITIONS: pos}


def mirage_predictions(correct: np.ndarray) -> dict:
    """Predicted exact match from a [items, positions] correctness matrix (NaN-padded).

    pred_em_pL: mean_i p^{L_i}, p the pooled per-token accuracy (p^L for one target length);
    pred_em_positions: mean_i prod_{j < L_i} acc_j, acc_j the accuracy at position j. Both equal
    exact match in expectation when token errors are independent (of each other and of items).
    """
    if not np.isfinite(correct).any():
        return {PRED_PL: np.nan, PRED_POSITIONS: np.nan}
    pred = _mirage_weighted(correct, np.ones((1, correct.shape[0])))
    return {k: float(v[0]) for k, v in pred.items()}


def _weighted_means(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of the finite ``values`` in each bootstrap resample (rows of item multiplicities)."""
    ok = np.isfinite(values)
    w = counts[:, ok].astype(float)
    tot = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, w @ values[ok] / tot, np.nan)


def score_records(records: list[dict], n_bootstrap: int = 1000, seed: int = 0, percentiles=CI_PERCENTILES) -> dict:
    """Every metric of one (run, task, step): {metric: {value, ci_lo, ci_hi, n_items}}.

    Intervals are percentile bootstrap intervals over items (``n_bootstrap`` resamples of the
    items with replacement, seeded, the same resamples for every metric); n_bootstrap=0 gives
    no interval (NaN). Includes per-position token accuracy (``token_accuracy_pos<j>``) and the
    mirage predictions (``pred_em_pL``, ``pred_em_positions``, recomputed on each resample).
    """
    if not records:
        return {}
    scores = item_scores(records)
    correct = correctness_matrix(records)
    columns = {m: scores[m].to_numpy(float) for m in METRICS}
    columns.update({f"{POSITION_PREFIX}{j}": correct[:, j] for j in range(correct.shape[1])})
    n = len(records)
    counts = resample_counts(n, n_bootstrap, np.random.default_rng(seed)) if n_bootstrap > 0 else None
    out = {}
    for name, vals in columns.items():
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        lo = hi = np.nan
        if counts is not None:
            iv = interval(_weighted_means(counts, vals), percentiles)
            lo, hi = (np.nan if iv[k] is None else iv[k] for k in ("low", "high"))
        out[name] = {"value": float(vals[ok].mean()), "ci_lo": lo, "ci_hi": hi, "n_items": int(ok.sum())}
    point = mirage_predictions(correct)
    samples = _mirage_weighted(correct, counts) if counts is not None and np.isfinite(correct).any() else {}
    for k in PREDICTIONS:
        lo = hi = np.nan
        if k in samples:
            iv = interval(samples[k], percentiles)
            lo, hi = (np.nan if iv[b] is None else iv[b] for b in ("low", "high"))
        out[k] = {"value": point[k], "ci_lo": lo, "ci_hi": hi, "n_items": n}
    return out


def seed_summary(table: pd.DataFrame, solve_threshold: float = SOLVE_THRESHOLD) -> pd.DataFrame:
    """Aggregate a tidy metrics table over seeds of the same model size.

    Groups by (source, model, task, step, metric) where ``model`` names a size (all seeds of
    it share it). Returns mean, std (ddof=0), min, max, n_seeds, mean of n_params, flops,
    tokens, eval_loss, baseline, item-CI bounds, and ``frac_solved``: the fraction of the
    group's runs whose exact match on that task and step is >= ``solve_threshold``
    (NaN when exact match was not measured).
    """
    keys = ["source", "model", "task", "step", "metric"]
    t = table.copy()
    num = ["n_params", "flops", "tokens", "eval_loss", "baseline", "ci_lo", "ci_hi", "n_items"]
    g = t.groupby(keys, dropna=False, sort=False)
    out = g["value"].agg(mean="mean", std=lambda v: float(np.std(v)), min="min", max="max", n_seeds="count")
    out = out.join(g[num].mean()).reset_index()
    em = t[t["metric"] == EXACT_MATCH].copy()
    em["solved"] = em["value"] >= solve_threshold
    solved = em.groupby(keys[:-1], dropna=False, sort=False)["solved"].mean().rename("frac_solved").reset_index()
    out = out.merge(solved, on=keys[:-1], how="left")
    return out
