"""Bad input and faults at the command line: one line on stderr, exit 2 (1 for a failed write), nothing written.

Each case runs ``sweeps.cli.main`` in-process; none trains a model or fits more than a tiny table.
"""

from __future__ import annotations

import errno
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


# --------------------------------------------------------------------------- the table

POINTS = "n_params_total,tokens,loss\n" + "".join(
    f"{n:g},{d:g},{2 + 400 / n**0.34 + 400 / d**0.28:.4f}\n"
    for n, d in ((1e6, 2e7), (2e6, 4e7), (4e6, 8e7), (1e6, 4e7), (2e6, 8e7), (4e6, 2e7), (8e6, 1e8))
)


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    """Bad files under tmp_path; the data cache points there too, so 'nothing written' covers it."""
    monkeypatch.setenv("CHINCHAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header_only.csv").write_text("n_params_total,tokens,loss\n")
    (tmp_path / "latin1.csv").write_bytes("n_params_total,tokens,loss,caf\xe9\n1,2,3,4\n".encode("latin-1"))
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "ok.csv").write_text(POINTS)
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(40)))
    (tmp_path / "list_run").mkdir()
    (tmp_path / "list_run" / "result.json").write_text("[]\n")
    for name, text in (("truncated", '{"flops_convention": "6N", "n_par'), ("empty", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ok.csv").write_text(POINTS)
        (tmp_path / name / "ok_fits").mkdir()
        (tmp_path / name / "ok_fits" / "fits.json").write_text(text)
    return tmp_path


CASES = [
    (["train", "--run-dir", "{t}/FILE/sub"], "FILE is a file, not a folder"),
    (["train", "--run-dir", "{t}/FILE"], "FILE is a file, not a folder"),
    (["train", "data.cache_dir={t}/FILE", "data.source=text:{t}/corpus.txt", "--run-dir", "{t}/run"],
     "data cache {t}/FILE/datasets: cannot create it (Not a directory)"),
    (["train", *HUGE, "--run-dir", "{t}/run"], "too large for memory"),
    (["sweep", "run", SPEC, "--out", "{t}/FILE", "--no-fit"], "--out {t}/FILE: {t}/FILE is a file"),
    (["sweep", "run", SPEC, "--out", "{t}/FILE/sub", "--no-fit"], "FILE is a file, not a folder"),
    (["sweep", "status", SPEC, "--out", "{t}/FILE"], "--out {t}/FILE: {t}/FILE is a file"),
    (["fit", "{t}/ok.csv", "--out-dir", "{t}/FILE", "--bootstrap", "0"], "cannot write the fits to {t}/FILE"),
    (["fit", "{t}/empty.csv"], "empty.csv: not a readable UTF-8 CSV/TSV table"),
    (["fit", "{t}/header_only.csv"], "header_only.csv: the table has no rows"),
    (["fit", "{t}/latin1.csv"], "latin1.csv: not a readable UTF-8 CSV/TSV table"),
    (["fit", "{t}/garbage.parquet"], "garbage.parquet: not a readable Parquet table"),
    (["fit", "{t}/list_run"], "list_run/result.json holds a JSON list, not an object"),
    (["fit", "{t}/ok.csv", "--bootstrap", "-5"], "argument --bootstrap: expected an integer >= 0, got -5"),
    (["fit", "{t}/ok.csv", "--bootstrap", "many"], "argument --bootstrap: expected an integer >= 0, got 'many'"),
    (["fit", "{t}/ok.csv", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["fit", "{t}/ok.csv", "--holdout-flops", "nan"], "argument --holdout-flops: expected a finite FLOP count > 0, got nan"),
    (["fit", "{t}/ok.csv", "--holdout-flops=-1e20"], "expected a finite FLOP count > 0, got -1e20"),
    (["fit", "{t}/ok.csv", "--budgets", "1e21", "inf"], "argument --budgets: expected a finite FLOP count > 0, got inf"),
    (["fit", "{t}/ok.csv", "--isoflop-budgets", "0"], "argument --isoflop-budgets: expected a finite FLOP count > 0"),
    (["plot", "{t}/truncated/ok.csv"], "cannot read {t}/truncated/ok_fits/fits.json"),
    (["plot", "{t}/empty/ok.csv"], "fits.json lacks flops_convention, n_params_column, loss_column, budgets"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(map(str, a))[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, message, inputs, capsys):
    before = _files(inputs)
    code, err = _run([str(a).replace("{t}", str(inputs)) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], err
    assert message.replace("{t}", str(inputs)) in lines[0]
    assert _files(inputs) == before  # nothing written, not even an empty folder


# --------------------------------------------------------------------------- faults: a full disk


def _disk_full(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)  # every atomic writer fsyncs its temp file before the rename


def test_full_disk_during_fit_is_one_line_and_leaves_no_temp_files(inputs, monkeypatch, capsys):
    _disk_full(monkeypatch)
    out = inputs / "out"
    code, err = _run(["fit", inputs / "ok.csv", "--out-dir", out, "--approach", "1", "--law", "none",
                      "--no-extrapolation", "--no-figures", "--bootstrap", "0", "--quiet"], capsys)  # fmt: skip
    assert code == 1
    assert err.strip() == f"chinchax: error: cannot write {out / 'fits.json'}: No space left on device"
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_full_disk_during_train_is_one_line_and_leaves_no_temp_files(inputs, monkeypatch, capsys):
    _disk_full(monkeypatch)
    run_dir = inputs / "run"
    tiny = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
            "model.vocab_size=32", "data.source=synthetic:markov", "train.steps=2", "train.batch_size=2",
            "train.eval_tokens=64", "train.progress=false"]  # fmt: skip
    code, err = _run(["train", *tiny, "--run-dir", run_dir], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(run_dir) in lines[0]
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".*.tmp"))


# --------------------------------------------------------------------------- file modes


def test_fit_outputs_are_0644_under_umask_022(inputs, capsys):
    out = inputs / "out"
    old = os.umask(0o022)
    try:
        code, _ = _run(["fit", inputs / "ok.csv", "--out-dir", out, "--approach", "1", "--law", "none",
                        "--no-extrapolation", "--bootstrap", "0", "--quiet"], capsys)  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"fits.json", "report.md", "compute_optimal.csv"} <= {p.name for p in files}
    assert any(p.suffix == ".png" for p in files) and any(p.suffix == ".pdf" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert not [p for p in files if p.name.startswith(".")]  # no temp files left


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


# --------------------------------------------------------------------------- analysis API and the fit benchmark


def test_fit_points_refuses_bad_arguments_before_fitting():
    import numpy as np
    import pandas as pd

    from analysis import AnalysisError, prepare
    from analysis.pipeline import fit_points

    runs = pd.DataFrame({"run": ["a", "b"], "status": "done", "n_params_total": [1e6, 2e6], "tokens": [2e7, 4e7],
                         "final_eval_loss": [3.0, 2.9]})  # fmt: skip
    pts = prepare(runs, pd.DataFrame(columns=["run"]), flops="6ND")
    for kwargs, message in (({"n_bootstrap": -5}, "n_bootstrap"), ({"seed": -1}, "seed"),
                            ({"holdout_flops": float("nan")}, "holdout_flops"), ({"holdout_flops": np.inf}, "holdout_flops")):  # fmt: skip
        with pytest.raises(AnalysisError, match=message):
            fit_points(pts, approaches=("1",), laws=(), progress=False, **kwargs)


def _fit_speed():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fit_speed.py"
    spec = importlib.util.spec_from_file_location("fit_speed_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--scipy-bootstrap", "-1"], ["--repeats", "0"], ["--scipy-starts", "0"],
                                  ["--n-bootstrap", "0"], ["--epoch-csv", "/nonexistent.csv"]])  # fmt: skip
def test_fit_speed_checks_arguments_before_the_work(argv, monkeypatch, capsys):
    bench = _fit_speed()

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started fitting before checking its arguments")

    monkeypatch.setattr(bench, "load_points", no_work)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and argv[0] in capsys.readouterr().err
