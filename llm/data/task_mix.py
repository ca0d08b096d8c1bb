"""Generated tasks mixed into the training stream (``data.tasks``, issue 10).

A ``TaskPool`` holds task documents (``Task.pretraining_text``: train items only,
unless the task is memorisation, whose test items are its train items) tokenised
with the run's tokenizer, each document followed by the end-of-text id, generated
in memory (about a second per million tokens) as a pure function of (tasks, params,
seed, tokenizer, pool_tokens). Each task gets an equal share of the pool.

Mixing: training batch ``step`` holds ``rows(step, b) = floor((step+1)*b*f) - floor(step*b*f)``
task sequences (``f`` = ``data.tasks.fraction``, exact rational arithmetic), so every
prefix of a run has exactly ``floor(steps*b*f)`` task sequences: the achieved fraction
is within ``1/(steps*b)`` of ``f``. Which rows, and which pool windows, come from a
generator seeded with (data seed, task seed, step). Task rows are whole windows of the
pool, corpus rows whole windows of the corpus; D counts both. The held-out split is
untouched: eval loss stays on corpus text only.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from llm.config import ConfigError, TaskMixConfig

_TASK_STREAM = 0x7A5C_0001  # separates task-row sampling from the corpus batch stream
_DOCS_PER_ENCODE = 256


class TaskPool:
    """Tokenised task documents plus the rule that places them in training batches.

    Attributes: ``names``, ``params`` (every task parameter, defaults included, per
    name), ``fraction`` (requested), ``seed``, ``tokens`` (int32 flat pool),
    ``n_tokens`` and ``n_tokens_per_task``, ``memorisation`` (names of memorisation tasks).
    """

    def __init__(self, mix: TaskMixConfig, tokenizer, *, seq_len: int):
        from llm.tasks import get_task

        self.names = tuple(mix.names)
        self.fraction = float(mix.fraction)
        # Exact decimal (0.3 is 3/10, not the nearest double): row counts never drift with float rounding.
        self._fraction = Fraction(repr(self.fraction))
        self.seed = int(mix.seed)
        params = mix.params or {}
        tasks = [get_task(name, **params.get(name, {})) for name in self.names]
        self.params = {t.name: dict(t.params) for t in tasks}
        self.memorisation = tuple(t.name for t in tasks if t.memorisation)
        budget = max(seq_len + 1, -(-mix.pool_tokens // len(tasks)))
        parts, self.n_tokens_per_task = [], {}
        for task in tasks:
            ids = _task_tokens(task, tokenizer, budget, self.seed)
            self.n_tokens_per_task[task.name] = int(ids.size)
            parts.append(ids)
        self.tokens = np.concatenate(parts).astype(np.int32)
        self.n_tokens = int(self.tokens.size)
        self.seq_len = seq_len

    def rows(self, step: int, batch_size: int) -> int:
        """Task sequences in training batch ``step`` (0-based)."""
        return math.floor((step + 1) * batch_size * self._fraction) - math.floor(step * batch_size * self._fraction)

    def achieved_fraction(self, steps: int, batch_size: int) -> float:
        """Share of the training tokens of the first ``steps`` batches that are task text."""
        if steps <= 0:
            return 0.0
        return math.floor(steps * batch_size * self._fraction) / (steps * batch_size)

    def mix_into(self, batch: np.ndarray, step: int, data_seed: int, batch_size: int | None = None,
                 first: int = 0) -> np.ndarray:
        """Overwrite ``rows(step, batch_size)`` rows of a corpus batch with task windows (in place).

        ``batch`` may be rows ``first``.. of a batch of ``batch_size`` (default: all of it); the
        rows drawn are those of the whole batch, so the parts of a batch add up to the batch.
        """
        b = batch.shape[0] if batch_size is None else batch_size
        k = self.rows(step, b)
        if k:
            rng = np.random.default_rng([_TASK_STREAM, int(data_seed) % 2**64, self.seed, int(step)])
            rows = rng.choice(b, size=k, replace=False)
            starts = rng.integers(0, self.n_tokens - self.seq_len, size=k)
            mine = (rows >= first) & (rows < first + batch.shape[0])
            batch[rows[mine] - first] = self.tokens[starts[mine, None] + np.arange(self.seq_len + 1)]
        return batch

    def summary(self, steps: int | None = None, batch_size: int | None = None) -> dict:
        """What result.json records about the mix."""
        out = {
            "names": list(self.names),
            "params": self.params,
            "fraction": self.fraction,
            "seed": self.seed,
            "pool_tokens": self.n_tokens,
            "pool_tokens_per_task": dict(self.n_tokens_per_task),
            "memorisation": list(self.memorisation),
        }
        if steps is not None and batch_size is not None:
            out["fraction_achieved"] = self.achieved_fraction(steps, batch_size)
        return out


def _task_tokens(task, tokenizer, budget: int, seed: int) -> np.ndarray:
    """At least ``budget`` tokens of ``task``'s pre-training documents (whole documents)."""
    parts, n = [], 0
    docs = task.pretraining_text(None, seed=seed)
    while n < budget:
        ids = tokenizer.encode_docs([next(docs) for _ in range(_DOCS_PER_ENCODE)])
        parts.append(np.asarray(ids, np.int32))
        n += ids.size
    return np.concatenate(parts)


def run_tokenizer(manifest: dict):
    """The tokenizer a prepared corpus was tokenised with (from its manifest)."""
    tok = manifest.get("tokenizer", {})
    if tok.get("name") == "bytes":
        from llm.data.tokenizers import ByteTokenizer

        return ByteTokenizer()
    if tok.get("name") == "bpe":
        from tokenizers import Tokenizer

        from llm.data.tokenizers import BPETokenizer

        return BPETokenizer(Tokenizer.from_file(tok["file"]), tok["hash"])
    raise ConfigError(f"data.tasks: source {manifest.get('source')} has no text tokenizer to encode tasks with")
