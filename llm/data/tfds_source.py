"""``tfds:<name>[/<config>]`` sources through tensorflow-datasets, without TensorFlow.

Examples are read with ``tfds.data_source`` (random access over array_record files),
never ``tfds.load`` (which needs TensorFlow) and never with a download: a dataset
must already be prepared in ``data.tfds_data_dir`` (default: TFDS's own), except
``tfds:chinchax_text``, which chinchax prepares itself from the text files in
``data.tfds_manual_dir``. Each example is one document; its text is the
``data.text_key`` feature. tensorflow_datasets is imported only here, lazily.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from llm.config import ConfigError, DataConfig

_READ_BATCH = 1024


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ConfigError("tfds: sources need the package tensorflow-datasets (pip install tensorflow-datasets array-record)") from err
    return tfds


def _open(name: str, data_cfg: DataConfig, data_dir: str | None):
    tfds = _import_tfds()
    try:
        return tfds.data_source(name, split=data_cfg.tfds_split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises assorted types (AssertionError, DatasetNotFoundError, ValueError)
        where = data_dir or "the default TFDS data_dir"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        try:
            if not tfds.builder(name, data_dir=data_dir).is_prepared():
                msg = "not prepared there"
        except Exception:
            pass  # keep tfds's own message
        raise ConfigError(
            f"data.source tfds:{name}: cannot open split {data_cfg.tfds_split!r} prepared in {where} "
            f"(chinchax never downloads; prepare it first): {msg}"
        ) from err


def _text(example, key: str, name: str) -> str:
    if not isinstance(example, dict) or key not in example:
        have = ", ".join(sorted(example)) if isinstance(example, dict) else type(example).__name__
        raise ConfigError(f"data.source tfds:{name}: examples have no feature data.text_key={key!r}; features: {have}")
    value = example[key]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ConfigError(f"data.source tfds:{name}: feature {key!r} is {type(value).__name__}, not text")


def _documents(source, name: str, key: str) -> Iterator[tuple[str, str]]:
    n = len(source)
    for start in range(0, n, _READ_BATCH):
        idx = list(range(start, min(n, start + _READ_BATCH)))
        try:
            batch = source.__getitems__(idx)
        except (AttributeError, TypeError):  # no batched reads (e.g. tfds.testing.mock_data)
            batch = [source[i] for i in idx]
        for i, example in zip(idx, batch):
            yield f"{i}", _text(example, key, name)


def _fingerprint(source, name: str, data_cfg: DataConfig) -> str:
    """Hash of the prepared files' metadata (dataset_info.json, file names and sizes),
    or of every example where there are no files (e.g. under tfds.testing.mock_data)."""
    h = hashlib.sha256(f"tfds:v1|{name}|{data_cfg.tfds_split}|{data_cfg.text_key}|{len(source)}".encode())
    info_dir = None
    try:
        info_dir = Path(str(source.dataset_info.data_dir))
    except Exception:
        pass
    files = sorted(p for p in info_dir.iterdir() if p.is_file()) if info_dir and info_dir.is_dir() else []
    if any(p.name == "dataset_info.json" for p in files):
        for p in files:
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    else:
        for k, text in _documents(source, name, data_cfg.text_key):
            h.update(k.encode())
            h.update(text.encode("utf-8"))
    return h.hexdigest()


def _manual_hash(manual_dir: str) -> str:
    root = Path(manual_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.tfds_manual_dir={manual_dir!r}: folder not found")
    from llm.data.text_files import visible_files

    files = visible_files(root)
    if not files:
        raise ConfigError(f"data.tfds_manual_dir={manual_dir!r}: no files inside")
    h = hashlib.sha256(b"chinchax_text:v1")
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def tfds_corpus(name: str, data_cfg: DataConfig, *, cache_dir: Path, progress: bool = True):
    """(fingerprint, function returning an iterator of (document key, text)) of a TFDS split."""
    if not name:
        raise ConfigError("data.source tfds:<name>[/<config>] needs a dataset name")
    data_dir = data_cfg.tfds_data_dir
    if name == "chinchax_text":  # with a config (chinchax_text/h...) it is read like any prepared dataset
        if not data_cfg.tfds_manual_dir:
            raise ConfigError("data.source tfds:chinchax_text needs data.tfds_manual_dir (a folder of text files)")
        from llm.data.tfds_text import NAME, prepare_local_text

        # The config name carries the content hash, so edited files get a fresh prepare.
        config = "h" + _manual_hash(data_cfg.tfds_manual_dir)[:16]
        data_dir = str(Path(data_dir).expanduser() if data_dir else cache_dir / "tfds")
        prepare_local_text(str(Path(data_cfg.tfds_manual_dir).expanduser()), data_dir, config, progress)
        name = f"{NAME}/{config}"
    source = _open(name, data_cfg, data_dir)
    fingerprint = _fingerprint(source, name, data_cfg)
    return fingerprint, lambda: _documents(source, name, data_cfg.text_key)
