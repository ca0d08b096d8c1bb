"""``load_dataset``: a tokenised corpus with pure, resumable batch sampling.

Training batch ``step`` is a pure function of (data seed, step): window starts are
drawn uniformly from the training pool by a NumPy generator seeded with
(seed, step), so a resumed run needs only the step. The evaluation set is a fixed
list of windows spread evenly over the held-out pool; it never changes between
calls, runs or seeds. With ``data.tasks`` a share of each training batch is task text
(``llm.data.task_mix``; batch i is then a function of (data seed, task seed, i)); the
evaluation windows stay pure corpus text, so eval losses compare across mixes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from llm.config import ConfigError, DataConfig
from llm.data.store import default_cache_dir, prepare_text

_STREAM = 0x5EED_DA7A  # separates batch sampling from any other use of the data seed


class TokenDataset:
    """Training pool and fixed held-out windows of one tokenised source.

    Attributes: ``vocab_size`` (model ids), ``seq_len``, ``n_train_tokens`` (unique
    training pool after the ``dataset_tokens`` cap), ``n_eval_tokens`` (tokens scored
    per evaluation pass: windows * seq_len; fewer than asked, with a warning, when the held-out
    pool is smaller), ``n_eval_pool_tokens``, ``manifest``,
    ``entropy_rate`` (nats/token, synthetic sources only, else None), ``tasks``
    (the ``TaskPool`` mixed into training batches by ``data.tasks``, else None; the
    held-out windows are corpus text either way).
    """

    def __init__(
        self,
        train: np.ndarray,
        eval_pool: np.ndarray,
        *,
        vocab_size: int,
        seq_len: int,
        eval_tokens: int,
        seed: int,
        manifest: dict,
        entropy_rate: float | None = None,
        eval_windows: np.ndarray | None = None,
        tasks=None,
    ):
        source = manifest.get("source", "data")
        window = seq_len + 1
        if train.shape[0] < window:
            raise ConfigError(
                f"{source}: training pool has {train.shape[0]} tokens, fewer than model.seq_len+1={window}; "
                "lower model.seq_len or raise data.dataset_tokens"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.manifest = manifest
        self.entropy_rate = entropy_rate
        self._train = train
        self.tasks = tasks
        self._bpe = None
        self.n_train_tokens = int(train.shape[0])
        if eval_windows is not None:  # e.g. independent synthetic sequences
            self._eval_windows = np.asarray(eval_windows, np.int32)
            self.n_eval_pool_tokens = int(self._eval_windows.size)
        else:
            n_pool = int(eval_pool.shape[0])
            if n_pool < window:
                raise ConfigError(
                    f"{source}: held-out split has {n_pool} tokens, fewer than model.seq_len+1={window}; "
                    "lower model.seq_len or raise data.eval_fraction"
                )
            # Non-overlapping targets: starts spaced >= seq_len apart, evenly over the pool.
            n_windows = max(1, min(math.ceil(eval_tokens / seq_len), (n_pool - 1) // seq_len))
            if n_windows < math.ceil(eval_tokens / seq_len):
                warnings.warn(
                    f"{source}: train.eval_tokens={eval_tokens} but the held-out split holds only {n_pool} tokens; "
                    f"each evaluation scores {n_windows * seq_len} tokens (raise data.eval_fraction to hold out more)",
                    stacklevel=2,
                )
            starts = np.floor(np.linspace(0, n_pool - window, n_windows)).astype(np.int64)
            self._eval_windows = np.asarray(eval_pool[starts[:, None] + np.arange(window)], np.int32)
            self.n_eval_pool_tokens = n_pool
        self.n_eval_tokens = int(self._eval_windows.shape[0] * seq_len)

    def train_batch(self, step: int, batch_size: int, rows: slice | None = None) -> np.ndarray:
        """int32 [batch_size, seq_len+1] windows of the training pool for optimiser step ``step``.

        ``rows`` (a slice of the batch): only those rows are built, the same as
        ``train_batch(step, batch_size)[rows]`` (each host of a multi-host run builds its own part).
        """
        rng = np.random.default_rng([_STREAM, int(self.seed) % 2**64, int(step)])
        starts = rng.integers(0, self.n_train_tokens - self.seq_len, size=batch_size)
        rows = slice(0, batch_size) if rows is None else rows
        batch = np.array(self._train[starts[rows, None] + np.arange(self.seq_len + 1)], np.int32)
        if self.tasks is not None:  # a share of rows become task windows: (data seed, task seed, step)
            self.tasks.mix_into(batch, step, self.seed, batch_size=batch_size, first=rows.indices(batch_size)[0])
        return batch

    def task_fraction(self, steps: int, batch_size: int) -> float:
        """Share of the training tokens of batches 0..steps-1 that are task text (0.0 without data.tasks)."""
        return 0.0 if self.tasks is None else self.tasks.achieved_fraction(steps, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The fixed held-out windows as int32 [b, seq_len+1] batches, b <= batch_size (last may be short)."""
        for i in range(0, self._eval_windows.shape[0], batch_size):
            yield self._eval_windows[i : i + batch_size]

    def decode(self, ids) -> str:
        """Text of token ids (for samples and debugging); synthetic ids print as numbers."""
        tok = self.manifest.get("tokenizer", {})
        if tok.get("name") == "bytes":
            from llm.data.tokenizers import ByteTokenizer

            return ByteTokenizer().decode(ids)
        if tok.get("name") == "bpe":
            if self._bpe is None:
                from tokenizers import Tokenizer

                self._bpe = Tokenizer.from_file(tok["file"])
            return self._bpe.decode([int(i) for i in ids], skip_special_tokens=False)
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.manifest.get('source')}, vocab={self.vocab_size}, seq_len={self.seq_len}, "
            f"train={self.n_train_tokens} tokens, eval={self.n_eval_tokens} tokens)"
        )


def _text_source(data_cfg: DataConfig, cache_dir: Path, progress: bool):
    scheme, _, name = data_cfg.source.partition(":")
    if scheme == "builtin":
        from llm.data.builtin import builtin_corpus

        fingerprint, _ = builtin_corpus(name)
        return fingerprint, lambda: builtin_corpus(name)[1]
    if scheme == "text":
        from llm.data.text_files import text_corpus

        return text_corpus(name)
    if scheme == "tfds":
        from llm.data.tfds_source import tfds_corpus

        return tfds_corpus(name, data_cfg, cache_dir=cache_dir, progress=progress)
    raise ConfigError(
        f"data.source={data_cfg.source!r}: unknown scheme {scheme!r}; "
        "choose builtin:<name>, text:<path or glob>, tfds:<name>[/<config>] or synthetic:<name>"
    )


def load_dataset(
    data_cfg: DataConfig, *, vocab_size: int, seq_len: int, eval_tokens: int, progress: bool = True
) -> TokenDataset:
    """Tokenise ``data_cfg.source`` (cached) and return its ``TokenDataset``.

    ``vocab_size`` and ``seq_len`` are the model's; ``eval_tokens`` sizes the fixed
    held-out evaluation set. Raises ConfigError naming the problem for a missing
    file, an empty corpus, an unknown source, or a split shorter than seq_len+1.
    """
    if seq_len < 1:
        raise ConfigError(f"model.seq_len must be > 0, got {seq_len}")
    cache_dir = default_cache_dir(data_cfg.cache_dir)
    if data_cfg.source.startswith("synthetic:"):
        from llm.data.synthetic import synthetic_dataset

        return synthetic_dataset(
            data_cfg, vocab_size=vocab_size, seq_len=seq_len, eval_tokens=eval_tokens, cache_dir=cache_dir
        )
    fingerprint, documents = _text_source(data_cfg, cache_dir, progress)
    manifest, folder = prepare_text(
        source=data_cfg.source,
        fingerprint=fingerprint,
        documents=documents,
        tokenizer=data_cfg.tokenizer,
        vocab_size=vocab_size,
        eval_fraction=data_cfg.eval_fraction,
        cache_dir=cache_dir,
        progress=progress,
    )
    dtype = np.dtype(manifest["dtype"])
    train = _memmap(folder / manifest["files"]["train"], dtype)
    eval_pool = _memmap(folder / manifest["files"]["eval"], dtype)
    if data_cfg.dataset_tokens is not None:
        if data_cfg.dataset_tokens > train.shape[0]:
            raise ConfigError(
                f"data.dataset_tokens={data_cfg.dataset_tokens} exceeds the {train.shape[0]} training tokens "
                f"of {data_cfg.source}; lower it or leave it unset"
            )
        train = train[: data_cfg.dataset_tokens]
    manifest = {**manifest, "dataset_tokens": data_cfg.dataset_tokens, "n_train_tokens": int(train.shape[0])}
    tasks = None
    if data_cfg.tasks is not None:
        from llm.data.task_mix import TaskPool, run_tokenizer

        tasks = TaskPool(data_cfg.tasks, run_tokenizer(manifest), seq_len=seq_len)
    return TokenDataset(
        train,
        eval_pool,
        vocab_size=vocab_size,
        seq_len=seq_len,
        eval_tokens=eval_tokens,
        seed=data_cfg.seed,
        manifest=manifest,
        tasks=tasks,
    )


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")
