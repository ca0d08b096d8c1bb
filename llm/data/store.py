"""Tokenise a corpus once into flat token files plus a JSON manifest, cached by content hash.

Layout under ``cache_dir/datasets``::

    <key>.train.bin  <key>.eval.bin   flat uint16 (vocab <= 65536) or uint32 token ids,
                                      each document followed by the end-of-text id
    <key>.docs.json                   document keys of each split (audit trail)
    <key>.json                        manifest, written last: its presence means complete

``key`` hashes (corpus fingerprint, eval_fraction, tokenizer, format version). Every
file is written to a temp file in the same folder then renamed, so a killed prepare
never leaves a half file that looks complete.

Held-out split: a document is held out iff a hash of its key falls below
``eval_fraction``, so the split is stable, never depends on the data seed, and
never puts one document in both splits. Training documents are stored in hash
order (a fixed shuffle), so a ``dataset_tokens`` prefix is a random sample of
documents rather than, say, only Genesis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from llm.config import ConfigError
from rundir import WriteError, write_bytes_atomic
from llm.data.tokenizers import BPE_VERSION, ByteTokenizer, train_bpe

FORMAT_VERSION = "1"
_BATCH_DOCS = 512  # documents per encode call (bounds memory, feeds the progress bar)


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else $CHINCHAX_CACHE, else ~/.cache/chinchax."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CHINCHAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chinchax"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def doc_unit(key: str) -> float:
    """A document's fixed pseudo-random number in [0, 1), from its key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def unigram_entropy(ids: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Entropy of the token frequencies of ``ids`` in nats/token: the loss of the best
    context-free model, a baseline a language model should beat."""
    counts = np.zeros(vocab_size, np.int64)
    for i in range(0, ids.shape[0], chunk):
        counts += np.bincount(np.asarray(ids[i : i + chunk]), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log(p)).sum())


def split_documents(docs: Iterable[tuple[str, str]], eval_fraction: float, source: str):
    """(train, eval) lists of (key, text), each in hash order; at least one document in each."""
    seen: set[str] = set()
    ranked = []
    for key, text in docs:
        if not text:
            continue
        if key in seen:
            raise ConfigError(f"data source {source}: duplicate document key {key!r}")
        seen.add(key)
        ranked.append((doc_unit(key), key, text))
    if not ranked:
        raise ConfigError(f"data source {source} is empty: no document holds any text")
    if len(ranked) < 2:
        raise ConfigError(f"data source {source} has only 1 document; the held-out split needs at least 2")
    ranked.sort()
    n_eval = sum(u < eval_fraction for u, _, _ in ranked)
    n_eval = min(max(n_eval, 1), len(ranked) - 1)  # small corpora: still one document each side
    # The n_eval lowest hashes are exactly those below eval_fraction (or the single lowest).
    eval_docs = [(k, t) for _, k, t in ranked[:n_eval]]
    train_docs = [(k, t) for _, k, t in ranked[n_eval:]]
    return train_docs, eval_docs


def _write_tokens(path: Path, docs, tokenizer, dtype, progress: bool, desc: str) -> tuple[int, int]:
    """Encode documents into ``path`` (atomically); returns (tokens, text bytes).

    Streamed (a corpus may not fit in memory), so not through rundir's writers; the temp file is
    opened like they open theirs (mode 0666 & ~umask, shareable) and removed on any failure.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    n_tokens = n_bytes = 0
    try:
        with open(tmp, "xb") as f, tqdm(
            total=len(docs), desc=desc, unit="doc", disable=not progress, delay=2.0, leave=False
        ) as bar:
            for i in range(0, len(docs), _BATCH_DOCS):
                texts = [t for _, t in docs[i : i + _BATCH_DOCS]]
                ids = tokenizer.encode_docs(texts)
                if ids.size and int(ids.max()) >= np.iinfo(dtype).max + 1:
                    raise ValueError("token id does not fit the file dtype")
                f.write(ids.astype(dtype).tobytes())
                n_tokens += ids.size
                n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                bar.update(len(texts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return n_tokens, n_bytes


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an advisory lock on ``path`` so parallel runs prepare a corpus once, not n times.

    The lock file is removed when the holder is done (or failed). A waiter may have opened it
    before the removal and then hold a lock on a file nobody else sees, so after locking it
    checks that ``path`` is still the file it locked, and otherwise starts again.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent prepares still end in identical, atomically renamed files
        yield
        return
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(f.fileno()).st_ino:
                continue  # removed (and maybe recreated) by the previous holder: lock the live one
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # still holding the lock: no one can be past this check on it
            return
        finally:
            f.close()  # closing releases the lock


def _complete(manifest_path: Path) -> dict | None:
    """The manifest if it and both token files are present with the recorded sizes."""
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in ("train", "eval"):
            f = manifest_path.parent / manifest["files"][split]
            if f.stat().st_size != manifest["tokens"][split] * itemsize:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return manifest


def prepare_text(
    *,
    source: str,
    fingerprint: str,
    documents: Callable[[], Iterator[tuple[str, str]]],
    tokenizer: str,
    vocab_size: int,
    eval_fraction: float,
    cache_dir: Path,
    progress: bool = True,
) -> tuple[dict, Path]:
    """Tokenise ``documents()`` once (or find it cached); returns (manifest, folder of its files)."""
    tok_spec = "bytes" if tokenizer == "bytes" else f"bpe{vocab_size}v{BPE_VERSION}"
    key = hashlib.sha256(f"{FORMAT_VERSION}|{fingerprint}|{eval_fraction!r}|{tok_spec}".encode()).hexdigest()[:24]
    folder = cache_dir / "datasets"
    manifest_path = folder / f"{key}.json"
    manifest = _complete(manifest_path)
    if manifest is not None:
        return manifest, folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"data cache {folder}: cannot create it ({err.strerror or err}); set data.cache_dir "
            "(or $CHINCHAX_CACHE) to a writable folder"
        ) from err
    with _exclusive(folder / f"{key}.lock"):
        manifest = _complete(manifest_path)  # another process may have finished meanwhile
        if manifest is None:
            manifest = _prepare(source, fingerprint, documents, tokenizer, vocab_size, eval_fraction,
                                cache_dir, folder, key, manifest_path, progress)
    return manifest, folder


def _prepare(source, fingerprint, documents, tokenizer, vocab_size, eval_fraction, cache_dir, folder, key,
             manifest_path, progress) -> dict:
    t0 = time.perf_counter()
    train_docs, eval_docs = split_documents(documents(), eval_fraction, source)
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        split_hash = hashlib.sha256(f"{fingerprint}|{eval_fraction!r}".encode()).hexdigest()
        tok = train_bpe(
            (t for _, t in train_docs), vocab_size=vocab_size, corpus_hash=split_hash, cache_dir=cache_dir, progress=progress
        )
    else:
        raise ConfigError(f"data.tokenizer={tokenizer!r} is not allowed; choose one of bytes, bpe")
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but model.vocab_size={vocab_size}")
    dtype = token_dtype(vocab_size)
    files = {"train": f"{key}.train.bin", "eval": f"{key}.eval.bin"}
    tokens, text_bytes = {}, {}
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        tokens[split], text_bytes[split] = _write_tokens(
            folder / files[split], docs, tok, dtype, progress, f"tokenising {source} ({split})"
        )
    train_ids = np.memmap(folder / files["train"], dtype=dtype, mode="r") if tokens["train"] else np.zeros(0, dtype)
    write_bytes_atomic(
        folder / f"{key}.docs.json",
        json.dumps({"train": [k for k, _ in train_docs], "eval": [k for k, _ in eval_docs]}).encode(),
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": source,
        "fingerprint": fingerprint,
        "tokenizer": {"name": tok.name, "hash": tok.hash, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eval_fraction": eval_fraction,
        "files": {**files, "documents": f"{key}.docs.json"},
        "documents": {"train": len(train_docs), "eval": len(eval_docs)},
        "tokens": tokens,
        "text_bytes": text_bytes,
        "unigram_entropy": unigram_entropy(train_ids, vocab_size),
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    if tokenizer == "bpe":
        manifest["tokenizer"]["file"] = str(cache_dir / "tokenizers" / f"bpe-{tok.hash}.json")
    write_bytes_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest
