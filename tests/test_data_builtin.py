"""The default corpus end to end: size, split by document, pure batches, the dataset_tokens cap, caching."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llm.config import DataConfig
from llm.data import load_dataset
from llm.data.store import doc_unit

SEQ_LEN = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ds(cache):
    cfg = DataConfig(cache_dir=str(cache))  # the default source
    return load_dataset(cfg, vocab_size=256, seq_len=SEQ_LEN, eval_tokens=4096, progress=False)


def _docs(ds, cache):
    return json.loads((cache / "datasets" / ds.manifest["files"]["documents"]).read_text())


def test_default_corpus_is_large_real_english(ds):
    m = ds.manifest
    assert m["source"] == DataConfig().source == "builtin:english"
    assert m["text_bytes"]["train"] + m["text_bytes"]["eval"] > 15e6
    # bytes tokenizer: one id per UTF-8 byte plus one end-of-text id per document
    for split in ("train", "eval"):
        assert m["tokens"][split] == m["text_bytes"][split] + m["documents"][split]
    text = bytes(ds.train_batch(0, 8).astype(np.uint8).ravel()).decode("utf-8", "replace")
    assert sum(w in text.split() for w in ("the", "of", "and", "a", "to")) >= 2


def test_split_is_by_document_and_never_overlaps(ds, cache):
    docs = _docs(ds, cache)
    train, held = set(docs["train"]), set(docs["eval"])
    assert not train & held
    assert len(train) == ds.manifest["documents"]["train"] and len(held) == ds.manifest["documents"]["eval"]
    assert any(k.startswith("kjv/") for k in train) and any(k.startswith("gcide/") for k in train)
    # held out exactly the documents whose key hash falls below eval_fraction
    frac = DataConfig().eval_fraction
    assert all(doc_unit(k) < frac for k in held) and all(doc_unit(k) >= frac for k in train)
    assert 0.5 * frac < len(held) / (len(held) + len(train)) < 2 * frac


def test_train_batch_is_a_pure_function_of_seed_and_step(ds, cache):
    b = ds.train_batch(7, 4)
    assert b.shape == (4, SEQ_LEN + 1) and b.dtype == np.int32
    assert np.array_equal(b, ds.train_batch(7, 4))
    assert not np.array_equal(b, ds.train_batch(8, 4))
    other_seed = load_dataset(
        DataConfig(cache_dir=str(cache), seed=1), vocab_size=256, seq_len=SEQ_LEN, eval_tokens=4096, progress=False
    )
    assert not np.array_equal(b, other_seed.train_batch(7, 4))
    code = textwrap.dedent(
        f"""
        from llm.config import DataConfig
        from llm.data import load_dataset
        ds = load_dataset(DataConfig(cache_dir={str(cache)!r}), vocab_size=256, seq_len={SEQ_LEN},
                          eval_tokens=4096, progress=False)
        print(ds.train_batch(7, 4).tolist())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == b.tolist()


def test_eval_set_is_fixed_and_sized(ds):
    first = [b.copy() for b in ds.eval_batches(16)]
    again = list(ds.eval_batches(16))
    assert len(first) == len(again) and all(np.array_equal(a, b) for a, b in zip(first, again))
    windows = np.concatenate(first)
    assert windows.shape == (4096 // SEQ_LEN, SEQ_LEN + 1) and windows.dtype == np.int32
    assert ds.n_eval_tokens == 4096
    assert all(b.shape[0] <= 16 for b in first)


def test_dataset_tokens_caps_the_training_pool(ds, cache):
    cap = 50_000
    capped = load_dataset(
        DataConfig(cache_dir=str(cache), dataset_tokens=cap), vocab_size=256, seq_len=SEQ_LEN, eval_tokens=4096, progress=False
    )
    assert capped.n_train_tokens == cap and capped.manifest["dataset_tokens"] == cap
    full = np.memmap(cache / "datasets" / ds.manifest["files"]["train"], dtype=np.uint16, mode="r")
    prefix = full[:cap].astype(np.uint8).tobytes()
    for step in range(20):
        for window in capped.train_batch(step, 8):
            at = prefix.find(window.astype(np.uint8).tobytes())
            assert 0 <= at <= cap - (SEQ_LEN + 1)
    # same held-out set with or without the cap
    assert all(np.array_equal(a, b) for a, b in zip(ds.eval_batches(64), capped.eval_batches(64)))


def test_prepared_files_are_reused(ds, cache):
    folder = cache / "datasets"
    manifest_path = folder / f"{ds.manifest['key']}.json"
    stamp = manifest_path.stat().st_mtime_ns
    load_dataset(DataConfig(cache_dir=str(cache)), vocab_size=256, seq_len=SEQ_LEN, eval_tokens=4096, progress=False)
    assert manifest_path.stat().st_mtime_ns == stamp
    assert not list(folder.glob("*.tmp"))
