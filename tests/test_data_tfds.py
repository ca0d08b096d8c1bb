"""TFDS without TensorFlow, offline: a real array_record prepare of local text, and mock_data."""

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from llm.config import ConfigError, DataConfig  # noqa: E402
from llm.data import load_dataset  # noqa: E402

DOCS = [f"Document {i}: über die Brücke, {i} times over the bridge." for i in range(30)]


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    root = tmp_path_factory.mktemp("manual")
    (root / "one.txt").write_text("\n\n".join(DOCS[:20]), encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "two.txt").write_text("\n\n".join(DOCS[20:]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(manual, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    cfg = DataConfig(source="tfds:chinchax_text", tfds_manual_dir=str(manual), tfds_data_dir=str(data_dir),
                     cache_dir=str(tmp_path_factory.mktemp("cache")), eval_fraction=0.2)
    return cfg, load_dataset(cfg, vocab_size=256, seq_len=16, eval_tokens=64, progress=False)


def test_local_text_builder_prepares_array_record_read_by_data_source(prepared):
    cfg, _ = prepared
    (version_dir,) = (p for p in (tfds.core.Path(cfg.tfds_data_dir) / "chinchax_text").glob("*/1.0.0"))
    assert any("array_record" in p.name for p in version_dir.iterdir())
    source = tfds.data_source(f"chinchax_text/{version_dir.parent.name}", split="train",
                              data_dir=cfg.tfds_data_dir, download=False)
    texts = sorted(source[i]["text"].decode("utf-8") for i in range(len(source)))
    assert texts == sorted(DOCS)


def test_tfds_dataset_holds_every_document_once(prepared):
    cfg, ds = prepared
    m = ds.manifest
    assert m["documents"]["train"] + m["documents"]["eval"] == len(DOCS) and m["documents"]["eval"] >= 1
    folder = Path(cfg.cache_dir) / "datasets"
    docs = []
    for split in ("train", "eval"):
        ids = np.fromfile(folder / m["files"][split], np.uint16).astype(np.uint8).tobytes()
        docs += [d.decode("utf-8") for d in ids.split(b"\0")[:-1]]
    assert sorted(docs) == sorted(DOCS)
    b = ds.train_batch(0, 4)
    assert b.shape == (4, 17) and np.array_equal(b, ds.train_batch(0, 4))


def test_prepared_tfds_dataset_is_reused(prepared):
    cfg, ds = prepared
    again = load_dataset(cfg, vocab_size=256, seq_len=16, eval_tokens=64, progress=False)
    assert again.manifest["key"] == ds.manifest["key"]
    assert np.array_equal(again.train_batch(5, 3), ds.train_batch(5, 3))


def test_any_prepared_dataset_in_a_data_dir_reads_back(prepared, tmp_path):
    cfg, ds = prepared
    (config_dir,) = (tfds.core.Path(cfg.tfds_data_dir) / "chinchax_text").iterdir()
    plain = DataConfig(source=f"tfds:chinchax_text/{config_dir.name}", tfds_data_dir=cfg.tfds_data_dir,
                       cache_dir=str(tmp_path), eval_fraction=0.2)
    again = load_dataset(plain, vocab_size=256, seq_len=16, eval_tokens=64, progress=False)
    assert again.manifest["tokens"] == ds.manifest["tokens"] and again.manifest["documents"] == ds.manifest["documents"]


def test_mock_data_source(tmp_path):
    cfg = DataConfig(source="tfds:imdb_reviews", cache_dir=str(tmp_path), eval_fraction=0.1)
    with tfds.testing.mock_data(num_examples=40):
        ds = load_dataset(cfg, vocab_size=256, seq_len=8, eval_tokens=16, progress=False)
        assert ds.manifest["documents"]["train"] + ds.manifest["documents"]["eval"] == 40
        assert ds.train_batch(1, 2).shape == (2, 9)
        with pytest.raises(ConfigError, match="no feature data.text_key='body'; features: label, text"):
            load_dataset(DataConfig(source="tfds:imdb_reviews", cache_dir=str(tmp_path), text_key="body"),
                         vocab_size=256, seq_len=8, eval_tokens=16, progress=False)


def test_unprepared_dataset_is_an_error_not_a_download(tmp_path):
    with pytest.raises(ConfigError, match="tfds:imdb_reviews: cannot open split 'train' prepared in .*not prepared"):
        load_dataset(DataConfig(source="tfds:imdb_reviews", tfds_data_dir=str(tmp_path), cache_dir=str(tmp_path)),
                     vocab_size=256, seq_len=8, eval_tokens=16, progress=False)
    with pytest.raises(ConfigError, match="data.tfds_manual_dir='/nonexistent': folder not found"):
        load_dataset(DataConfig(source="tfds:chinchax_text", tfds_manual_dir="/nonexistent", cache_dir=str(tmp_path)),
                     vocab_size=256, seq_len=8, eval_tokens=16, progress=False)
