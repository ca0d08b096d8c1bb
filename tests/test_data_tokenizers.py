"""Tokenizer round trips (bytes and byte-level BPE, non-ASCII included) and the BPE cache."""

import numpy as np
import pytest

from llm.data.tokenizers import EOT, ByteTokenizer, train_bpe

SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "naïve café, façade — “quotes” and ‘apostrophes’…",
    "日本語のテキスト, ελληνικά, русский, עברית 🙂🚀",
    "tabs\tand\nnewlines\r\n  leading spaces, trailing  ",
    "",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "And God said, Let there be light: and there was light.",
    "Zoë's café served crème brûlée and smörgåsbord.",
    "A dictionary defines words: word, n. A sound or combination of sounds.",
] * 20


def test_bytes_round_trip_and_ids():
    tok = ByteTokenizer()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and (ids >= 0).all() and (ids < 256).all()
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert list(tok.encode("é")) == [0xC3, 0xA9]


def test_bytes_documents_end_with_eot():
    tok = ByteTokenizer()
    ids = tok.encode_docs(["ab", "ü"])
    assert list(ids) == [97, 98, 0, 0xC3, 0xBC, 0]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bpe")
    return train_bpe(iter(CORPUS), vocab_size=300, corpus_hash="test-corpus", cache_dir=cache, progress=False), cache


def test_bpe_round_trip_non_ascii(bpe):
    tok, _ = bpe
    assert tok.vocab_size <= 300
    for text in SAMPLES + CORPUS[:4]:
        ids = tok.encode(text)
        assert (ids < tok.vocab_size).all()
        assert tok.decode(ids) == text
    # merges learnt from the corpus compress it below one id per byte
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_documents_and_eot(bpe):
    tok, _ = bpe
    assert tok.eot_id == tok._tok.token_to_id(EOT)
    ids = tok.encode_docs(["light", "café"])
    assert list(ids).count(tok.eot_id) == 2 and ids[-1] == tok.eot_id
    cut = list(ids).index(tok.eot_id)
    assert tok.decode(ids[:cut]) == "light" and tok.decode(ids[cut + 1 : -1]) == "café"


def test_bpe_is_cached_by_content_hash(bpe):
    tok, cache = bpe
    files = list((cache / "tokenizers").glob("bpe-*.json"))
    assert [f.name for f in files] == [f"bpe-{tok.hash}.json"]
    # same (corpus hash, vocab): loaded from the file, even from an empty iterator
    again = train_bpe(iter([]), vocab_size=300, corpus_hash="test-corpus", cache_dir=cache, progress=False)
    assert again.hash == tok.hash and list(again.encode(SAMPLES[1])) == list(tok.encode(SAMPLES[1]))
    other = train_bpe(iter(CORPUS), vocab_size=280, corpus_hash="test-corpus", cache_dir=cache, progress=False)
    assert other.hash != tok.hash and other.vocab_size <= 280
