"""text:<path or glob> sources, BPE datasets, and the one-line errors for bad data settings."""

import collections
import math
import os

import numpy as np
import pytest

from llm.config import ConfigError, DataConfig
from llm.data import load_dataset
from llm.data.store import split_documents
from llm.data.tokenizers import ByteTokenizer

PARAGRAPHS = [f"Paragraph {i}: the cat sat on the mat, naïvely — número {i}." for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("\n\n".join(PARAGRAPHS[:40]) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n \n".join(PARAGRAPHS[40:]), encoding="utf-8")
    return root


def _load(source, tmp_path, **kw):
    params = dict(vocab_size=256, seq_len=16, eval_tokens=64, progress=False)
    for key in ("vocab_size", "seq_len", "eval_tokens"):
        if key in kw:
            params[key] = kw.pop(key)
    return load_dataset(DataConfig(source=source, cache_dir=str(tmp_path / "cache"), **kw), **params)


def test_text_glob_documents_are_paragraphs(corpus, tmp_path):
    ds = _load(f"text:{corpus}/*.txt", tmp_path, eval_fraction=0.2)
    m = ds.manifest
    assert m["documents"]["train"] + m["documents"]["eval"] == 60
    assert m["text_bytes"]["train"] + m["text_bytes"]["eval"] == sum(len(p.encode()) for p in PARAGRAPHS)
    # every held-out paragraph is absent from the training tokens
    folder = tmp_path / "cache" / "datasets"
    train = np.fromfile(folder / m["files"]["train"], np.uint16).astype(np.uint8).tobytes()
    held = np.fromfile(folder / m["files"]["eval"], np.uint16).astype(np.uint8).tobytes().split(b"\0")[:-1]
    assert len(held) == m["documents"]["eval"] >= 1
    assert all(h.decode() in PARAGRAPHS and h not in train for h in held)
    assert ds.decode(np.frombuffer(held[0], np.uint8)) == held[0].decode()
    # unigram entropy of the training tokens, by hand
    counts = collections.Counter(train)
    probs = [c / len(train) for c in counts.values()]
    assert m["unigram_entropy"] == pytest.approx(-sum(p * math.log(p) for p in probs), rel=1e-9)
    # a folder names the same files
    assert _load(f"text:{corpus}", tmp_path, eval_fraction=0.2).manifest["key"] == m["key"]


def test_split_keeps_documents_whole_and_is_stable():
    docs = [(f"d{i}", f"text {i}") for i in range(200)]
    train, held = split_documents(docs, 0.1, "test")
    assert sorted(train + held) == sorted(docs) and not {k for k, _ in train} & {k for k, _ in held}
    more_train, more_held = split_documents(docs + [(f"e{i}", "x") for i in range(50)], 0.1, "test")
    assert {k for k, _ in held} <= {k for k, _ in more_held}  # adding documents never moves old ones
    tiny_train, tiny_held = split_documents(docs[:2], 0.01, "test")  # tiny corpora: one each side
    assert len(tiny_train) == len(tiny_held) == 1


def test_bpe_dataset_round_trips_the_corpus(corpus, tmp_path):
    ds = _load(f"text:{corpus}/a.txt", tmp_path, tokenizer="bpe", vocab_size=300, eval_fraction=0.2)
    m = ds.manifest
    assert m["tokenizer"]["name"] == "bpe" and m["tokenizer"]["vocab_size"] <= 300 and m["dtype"] == "uint16"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(m["tokenizer"]["file"])
    ids = np.fromfile(tmp_path / "cache" / "datasets" / m["files"]["train"], np.uint16)
    eot = m["tokenizer"]["eot_id"]
    cuts = np.flatnonzero(ids == eot)
    texts = [tok.decode(ids[a + 1 : b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]
    assert len(texts) == m["documents"]["train"] and all(t in PARAGRAPHS for t in texts)
    assert len(ids) < m["text_bytes"]["train"]  # merges compress
    assert ds.decode(ids[: cuts[0]]) == texts[0]


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        ("text:/nonexistent/corpus.txt", {}, "/nonexistent/corpus.txt: file not found"),
        ("text:/nonexistent/*.txt", {}, "no file matches"),
        ("builtin:shakespeare", {}, "builtin:kjv, builtin:gcide, builtin:english"),
        ("synthetic:nope", {}, "synthetic:markov"),
        ("tfds:chinchax_text", {}, "tfds_manual_dir"),
    ],
)
def test_bad_sources_name_the_problem(source, kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        _load(source, tmp_path, **kwargs)


def test_empty_and_short_corpora(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n \n")
    with pytest.raises(ConfigError, match=f"text:{empty} is empty"):
        _load(f"text:{empty}", tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n\nmore".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt is not UTF-8"):
        _load(f"text:{bad}", tmp_path)
    with pytest.raises(ConfigError, match="held-out split has .* fewer than model.seq_len\\+1=2049"):
        _load(f"text:{corpus}", tmp_path, seq_len=2048)
    with pytest.raises(ConfigError, match="training pool has 100 tokens, fewer than model.seq_len\\+1=129"):
        _load(f"text:{corpus}", tmp_path, seq_len=128, dataset_tokens=100)


def test_incomplete_cache_files_are_rebuilt(corpus, tmp_path):
    ds = _load(f"text:{corpus}", tmp_path)
    folder = tmp_path / "cache" / "datasets"
    train_path = folder / ds.manifest["files"]["train"]
    # a token file cut short (e.g. a partial copy) is detected and rebuilt; replaced as a new
    # file, never truncated in place, because open datasets still map the old one
    short = folder / "short.part"
    short.write_bytes(train_path.read_bytes()[:100])
    os.replace(short, train_path)
    again = _load(f"text:{corpus}", tmp_path)
    assert again.n_train_tokens == ds.n_train_tokens and train_path.stat().st_size == 2 * ds.n_train_tokens
    assert np.array_equal(again.train_batch(3, 2), ds.train_batch(3, 2))
    (folder / f"{ds.manifest['key']}.json").unlink()  # no manifest: not complete, prepared again
    assert _load(f"text:{corpus}", tmp_path).manifest["tokens"] == ds.manifest["tokens"]
    assert not list(folder.glob("*.tmp"))


def test_dataset_tokens_beyond_the_pool_is_an_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="data.dataset_tokens=10000000 exceeds the .* training tokens of text:"):
        _load(f"text:{corpus}", tmp_path, dataset_tokens=10_000_000)


def test_bytes_tokenizer_needs_vocab_256(corpus, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size=128"):
        _load(f"text:{corpus}", tmp_path, vocab_size=128)
    assert ByteTokenizer().vocab_size == 256
