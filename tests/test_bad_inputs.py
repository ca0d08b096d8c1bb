"""Bad input and faults at the command line: one line on stderr, exit 2 (1 for a failed write), nothing written.

Each case runs ``sweeps.cli.main`` in-process; none trains a model or fits more than a tiny table.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from llm.config import ConfigError, load_config
from llm.memory import ACTIVATION_FACTOR, check_fits, training_bytes
from sweeps.cli import main

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
HUGE = ["model.d_model=65536", "model.n_layers=64"]


def _run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``chinchax argv`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- memory estimate


def test_training_bytes_by_hand():
    cfg = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=256",
                             "model.vocab_size=256", "model.seq_len=32", "train.batch_size=8", "train.grad_accum=2"])  # fmt: skip
    # N = embed 2*256*64 + norms (2*2+1)*64 + 2 layers * (attention 4*64*64 + SwiGLU 3*64*256)
    n = 2 * 256 * 64 + 5 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 256)
    got = training_bytes(cfg)
    assert got["params"] == 4 * n and got["adam"] == 8 * n
    assert got["grads"] == 8 * n  # grad_accum > 1 keeps a running sum beside the micro-batch grads
    assert got["activations"] == 4 * 32 * 64 * 2 * ACTIVATION_FACTOR * 2  # micro-batch 4, bfloat16
    assert got["logits"] == 4 * 32 * 256 * 4
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_memory_check_refuses_a_huge_model_and_passes_the_default():
    with pytest.raises(ConfigError, match=r"too large for memory: .* TB .* is 16.0 GB"):
        check_fits(load_config(None, HUGE), available=(16 * 10**9, "host RAM"))
    assert check_fits(load_config())["total"] < 10**9  # the default config fits on any laptop
    check_fits(load_config(), available=(None, "unknown"))  # an unknown limit never refuses


def test_train_refuses_a_huge_model_before_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _run(["train", *HUGE, "--run-dir", run_dir], capsys)
    assert code == 2 and "too large for memory" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


# --------------------------------------------------------------------------- data cache: lock files and modes


def _load_text(root: Path, cache: Path, **kw):
    from llm.config import DataConfig
    from llm.data import load_dataset

    data = DataConfig(source=f"text:{root}", cache_dir=str(cache), **kw)
    vocab = 300 if kw.get("tokenizer") == "bpe" else 256
    return load_dataset(data, vocab_size=vocab, seq_len=8, eval_tokens=16, progress=False)


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(40)))
    return root


def test_data_errors_leave_no_lock_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n\nmore".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        _load_text(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.lock"))


def test_prepared_cache_files_are_shareable_and_lock_free(corpus, tmp_path):
    old = os.umask(0o022)
    try:
        _load_text(corpus, tmp_path / "cache", tokenizer="bpe")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".bin", ".json"} and any("tokenizers" in p.parts for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert not [p for p in files if p.suffix in (".lock", ".tmp")]


def test_cache_lock_excludes_and_is_removed(tmp_path):
    import threading
    import time

    from llm.data.store import _exclusive

    lock = tmp_path / "k.lock"
    inside, most = [0], [0]
    guard = threading.Lock()

    def worker():
        for _ in range(15):
            with _exclusive(lock):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1  # removing the file never lets two holders in at once
    assert not lock.exists()


def test_unusable_cache_dir_is_a_config_error(corpus, tmp_path):
    blocker = tmp_path / "FILE"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="data cache .*FILE/datasets: cannot create it"):
        _load_text(corpus, blocker)
