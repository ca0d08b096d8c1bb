"""synthetic:markov: exact entropy rate against hand computations and against the samples."""

import math

import numpy as np
import pytest

from llm.config import ConfigError, DataConfig, config_from_dict
from llm.data import load_dataset
from llm.data.synthetic import dense_transition, entropy_rate, markov_chain, stationary_distribution


def _h(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_two_state_chain_by_hand():
    a, b = 0.1, 0.4  # P(0->1) = a, P(1->0) = b
    p = np.array([[1 - a, a], [b, 1 - b]])
    pi = np.array([b, a]) / (a + b)  # balance: pi0 * a = pi1 * b
    assert np.allclose(stationary_distribution(p), pi)
    assert entropy_rate(p) == pytest.approx(pi[0] * _h([1 - a, a]) + pi[1] * _h([b, 1 - b]), rel=1e-12)
    # deterministic cycle: zero entropy; i.i.d. uniform rows: ln 2
    assert entropy_rate(np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    assert entropy_rate(np.full((2, 2), 0.5)) == pytest.approx(math.log(2))


def test_chain_rows_are_distributions_with_the_cycle_edge():
    succ, probs = markov_chain(32, alpha=0.3, support=4)
    assert succ.shape == probs.shape == (32, 4)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.array_equal(succ[:, 0], (np.arange(32) + 1) % 32)  # irreducible via the cycle
    p = dense_transition(succ, probs)
    assert np.allclose(p.sum(axis=1), 1.0)
    pi = stationary_distribution(p)
    assert np.allclose(pi @ p, pi) and pi.min() > 0


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    cfg = DataConfig(source="synthetic:markov", dataset_tokens=400_000, markov_alpha=0.5, markov_support=4,
                     cache_dir=str(tmp_path_factory.mktemp("c")))
    return load_dataset(cfg, vocab_size=16, seq_len=32, eval_tokens=512, progress=False)


def test_markov_dataset_records_entropy_and_matches_samples(markov):
    h = markov.entropy_rate
    assert markov.manifest["entropy_rate"] == h and 0 < h < math.log(4)
    assert markov.n_train_tokens == 400_000 and markov.vocab_size == 16
    # empirical conditional entropy H(x_t | x_{t-1}) of the training pool ~ h
    pool = np.concatenate([markov.train_batch(s, 64) for s in range(100)])
    x, y = pool[:, :-1].ravel(), pool[:, 1:].ravel()
    counts = np.zeros((16, 16))
    np.add.at(counts, (x, y), 1)
    cond = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        est = -np.nansum(counts / counts.sum() * np.log(cond))
    assert est == pytest.approx(h, abs=0.02)


def test_markov_batches_are_pure_and_eval_fixed(markov):
    b = markov.train_batch(3, 8)
    assert b.shape == (8, 33) and b.dtype == np.int32 and b.max() < 16
    assert np.array_equal(b, markov.train_batch(3, 8)) and not np.array_equal(b, markov.train_batch(4, 8))
    windows = np.concatenate(list(markov.eval_batches(5)))
    assert windows.shape == (512 // 32, 33)
    assert np.array_equal(windows, np.concatenate(list(markov.eval_batches(7))))


def test_markov_vocab_is_the_model_vocab_and_bad_names_fail():
    config_from_dict({"data": {"source": "synthetic:markov"}, "model": {"vocab_size": 64}})  # no tokenizer clash
    with pytest.raises(ConfigError, match="synthetic:markov"):
        load_dataset(DataConfig(source="synthetic:zipf"), vocab_size=16, seq_len=8, eval_tokens=64)
    with pytest.raises(ConfigError, match="markov_support"):
        config_from_dict({"data": {"source": "synthetic:markov", "markov_support": 1}})
