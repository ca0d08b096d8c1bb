"""Tokenizers: raw UTF-8 ``bytes`` (vocab 256) and a byte-level BPE trained locally.

Both are lossless: ``decode(encode(text)) == text`` for any string. Documents are
joined with an end-of-text id (``eot_id``): byte 0 (NUL) for ``bytes``, since real
text never holds it, and a ``<|endoftext|>`` special token for BPE.

The BPE (HF ``tokenizers``: ByteLevel pre-tokenizer, no normaliser, ByteLevel
decoder) is trained on the training documents only and cached as JSON under
``cache_dir/tokenizers`` by a hash of (corpus fingerprint, vocab size, version).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rundir import write_text_atomic

# Bump when training settings change: part of the BPE cache key.
BPE_VERSION = "1"
EOT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    name = "bytes"
    vocab_size = 256
    eot_id = 0

    @property
    def hash(self) -> str:
        return "bytes-utf8-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_docs(self, texts: Sequence[str]) -> np.ndarray:
        """Flat ids of ``texts``, each followed by ``eot_id``."""
        if not texts:
            return np.zeros(0, np.uint8)
        return np.frombuffer(b"\x00".join(t.encode("utf-8") for t in texts) + b"\x00", dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE from HF ``tokenizers``; id 0 is the end-of-text token."""

    name = "bpe"

    def __init__(self, tok, hash_: str):
        self._tok = tok
        self.hash = hash_
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def encode_docs(self, texts: Sequence[str]) -> np.ndarray:
        """Flat ids of ``texts``, each followed by ``eot_id``."""
        eot = np.asarray([self.eot_id], np.int32)
        parts = []
        for ids in self.encode_batch(texts):
            parts += [ids, eot]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _new_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    corpus_hash: str,
    cache_dir: str | Path,
    progress: bool = True,
) -> BPETokenizer:
    """Train (or load from cache) a byte-level BPE with ``vocab_size`` ids on ``texts``.

    The vocabulary is 1 special token + 256 bytes + merges; on a corpus too small
    to learn all merges it ends up smaller than ``vocab_size`` (ids stay < vocab_size).
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    key = hashlib.sha256(f"bpe:{BPE_VERSION}:{vocab_size}:{corpus_hash}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return BPETokenizer(Tokenizer.from_file(str(path)), key)
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    write_text_atomic(path, tok.to_str(pretty=True))  # what tok.save writes, with shareable modes
    return BPETokenizer(tok, key)
