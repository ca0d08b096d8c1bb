"""``synthetic:markov``: a random first-order Markov source with an exactly known entropy rate.

Each token ``i`` of the model vocabulary (V ids) may be followed by ``support``
tokens: ``(i+1) mod V`` (which makes the chain irreducible) and ``support-1``
others drawn uniformly (repeats merge). Their probabilities are a
Dirichlet(``alpha``) draw: small ``alpha`` gives peaked rows and a low entropy rate.
The chain is fixed by (V, alpha, support) alone; ``data.seed`` only picks which
sequences are sampled.

Entropy rate (Cover & Thomas 4.2): h = -sum_i pi_i sum_j P_ij ln P_ij, with pi the
stationary distribution (pi P = pi). Every sequence starts from pi, so the process
is stationary, and since each target has at least one token of context the best
achievable loss at every position is exactly h nats/token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from llm.config import ConfigError, DataConfig

SYNTHETIC = ("markov",)
DEFAULT_POOL_TOKENS = 2**23  # training pool when data.dataset_tokens is unset
_CHAIN_LEN = 2**14  # training pool = independent chains of this length, concatenated
_STRUCTURE_SEED = 0x3A7C0F


def markov_chain(vocab_size: int, alpha: float, support: int) -> tuple[np.ndarray, np.ndarray]:
    """(successor ids [V, k] int64, probabilities [V, k] float64) of the canonical random chain."""
    rng = np.random.default_rng([_STRUCTURE_SEED, vocab_size, support, int(round(alpha * 1e9))])
    k = min(support, vocab_size)
    succ = np.empty((vocab_size, k), np.int64)
    succ[:, 0] = (np.arange(vocab_size) + 1) % vocab_size
    succ[:, 1:] = rng.integers(0, vocab_size, size=(vocab_size, k - 1))
    g = rng.gamma(alpha, size=(vocab_size, k)) + 1e-300  # Dirichlet via normalised gammas; no all-zero row
    return succ, g / g.sum(axis=1, keepdims=True)


def dense_transition(succ: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Dense [V, V] transition matrix (repeated successors summed)."""
    v = succ.shape[0]
    p = np.zeros((v, v))
    np.add.at(p, (np.repeat(np.arange(v), succ.shape[1]), succ.ravel()), probs.ravel())
    return p


def stationary_distribution(p: np.ndarray) -> np.ndarray:
    """pi with pi P = pi, sum(pi) = 1, for an irreducible transition matrix P [V, V]."""
    v = p.shape[0]
    a = p.T - np.eye(v)
    a[-1, :] = 1.0  # replace one (redundant) balance equation by the normalisation
    b = np.zeros(v)
    b[-1] = 1.0
    pi = np.linalg.solve(a, b)
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()


def entropy_rate(p: np.ndarray) -> float:
    """Entropy rate in nats/token of the stationary Markov chain with transition matrix P."""
    pi = stationary_distribution(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(pi @ row_h)


def sample_chains(succ, probs, pi, n_chains: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n_chains, length] sequences, each started from pi (stationary)."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    out = np.empty((n_chains, length), np.int64)
    out[:, 0] = np.minimum(np.searchsorted(np.cumsum(pi), rng.random(n_chains), side="right"), len(pi) - 1)
    u = rng.random((n_chains, length))
    for t in range(1, length):
        cur = out[:, t - 1]
        idx = (cdf[cur] <= u[:, t, None]).sum(axis=1)
        out[:, t] = succ[cur, np.minimum(idx, succ.shape[1] - 1)]
    return out


def synthetic_dataset(data_cfg: DataConfig, *, vocab_size: int, seq_len: int, eval_tokens: int, cache_dir: Path):
    """TokenDataset of ``synthetic:<name>``: a training pool plus independent held-out sequences."""
    from llm.data.dataset import TokenDataset

    name = data_cfg.source.split(":", 1)[1]
    if name not in SYNTHETIC:
        raise ConfigError(f"unknown synthetic source 'synthetic:{name}'; choose one of {', '.join('synthetic:' + n for n in SYNTHETIC)}")
    if vocab_size > 4096:
        raise ConfigError(f"synthetic:markov supports model.vocab_size <= 4096 (exact stationary solve), got {vocab_size}")
    alpha, support = data_cfg.markov_alpha, data_cfg.markov_support
    succ, probs = markov_chain(vocab_size, alpha, support)
    p = dense_transition(succ, probs)
    pi = stationary_distribution(p)
    h = entropy_rate(p)

    n_train = data_cfg.dataset_tokens or DEFAULT_POOL_TOKENS
    chain_len = min(_CHAIN_LEN, max(n_train, seq_len + 1))
    rng = np.random.default_rng([_STRUCTURE_SEED, 1, data_cfg.seed])
    train = sample_chains(succ, probs, pi, -(-n_train // chain_len), chain_len, rng).ravel()[:n_train]
    n_windows = max(1, -(-eval_tokens // seq_len))
    eval_rng = np.random.default_rng([_STRUCTURE_SEED, 2])  # fixed across data seeds
    eval_windows = sample_chains(succ, probs, pi, n_windows, seq_len + 1, eval_rng)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    manifest = {
        "source": data_cfg.source,
        "tokenizer": {"name": "identity", "vocab_size": vocab_size},
        "vocab_size": vocab_size,
        "markov": {"order": 1, "alpha": alpha, "support": min(support, vocab_size),
                   "structure_hash": hashlib.sha256(succ.tobytes() + probs.tobytes()).hexdigest()[:16]},
        "entropy_rate": h,
        "unigram_entropy": float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum()),
        "tokens": {"train": int(train.size), "eval": int(eval_windows.size)},
        "dataset_tokens": data_cfg.dataset_tokens,
        "n_train_tokens": int(train.size),
    }
    return TokenDataset(
        train.astype(dtype),
        np.zeros(0, dtype),
        vocab_size=vocab_size,
        seq_len=seq_len,
        eval_tokens=eval_tokens,
        seed=data_cfg.seed,
        manifest=manifest,
        entropy_rate=h,
        eval_windows=eval_windows,
    )
