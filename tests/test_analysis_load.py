"""load_runs on hand-written run directories and tables; FLOP conventions; bad-input errors."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from analysis.load import AnalysisError, AnalysisWarning, load_runs, select_flops
from analysis.prepare import prepare


def _result(name, status="done", n=1000, d=20000, loss=3.0):
    return {
        "status": status, "error": None if status == "done" else "diverged", "run_name": name, "step": 10,
        "steps": 10, "tokens": d, "dataset_tokens": None, "n_params_total": n + 100, "n_params_nonembed": n,
        "n_params_active": n + 100, "n_params_active_nonembed": n,
        "flops": {"6N": 6.0 * n * d, "6N+attention": 7.0 * n * d}, "flops_per_token": {"6N": 6.0 * n, "6N+attention": 7.0 * n},
        "final_train_loss": loss + 0.1, "final_eval_loss": loss, "best_eval_loss": loss - 0.01, "entropy_rate": None,
        "wall_time_s": 1.0, "tokens_per_s": 1.0, "hardware": {}, "versions": {},
    }  # fmt: skip


def _metrics(n, steps=(1, 5, 10), eval_steps=(1, 10)):
    lines = []
    for s in steps:
        rec = {"step": s, "tokens": 2000 * s, "flops": {"6N": 6.0 * n * 2000 * s, "6N+attention": 7.0 * n * 2000 * s},
               "train_loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": None}  # fmt: skip
        if s in eval_steps:
            rec["eval_loss"] = 5.0 - 0.2 * s
        lines.append(json.dumps(rec))
    return "\n".join(lines) + "\n"


@pytest.fixture()
def sweep_dir(tmp_path):
    for name, status, n in (("a", "done", 1000), ("b", "done", 4000), ("c", "failed", 2000)):
        run = tmp_path / name
        run.mkdir()
        (run / "result.json").write_text(json.dumps(_result(name, status, n)))
        (run / "metrics.jsonl").write_text(_metrics(n))
    running = tmp_path / "d"
    running.mkdir()
    (running / "metrics.jsonl").write_text(_metrics(500, steps=(1, 5)) + '{"step": 6, "tok')  # killed mid-line
    (tmp_path / "sweep.yaml").write_text("name: test\n")
    (tmp_path / "notes").mkdir()  # not a run directory
    return tmp_path


def test_load_sweep_directory(sweep_dir):
    runs, curves = load_runs(sweep_dir)
    assert sorted(runs["run"]) == ["a", "b", "c", "d"]
    a = runs.set_index("run").loc["a"]
    assert a["status"] == "done" and a["n_params_nonembed"] == 1000 and a["n_params_total"] == 1100
    assert a["flops_6N"] == 6.0 * 1000 * 20000 and a["flops_6N+attention"] == 7.0 * 1000 * 20000
    assert a["final_eval_loss"] == 3.0 and a["best_eval_loss"] == pytest.approx(2.99)
    assert runs.set_index("run").loc["d", "status"] == "unfinished"
    ca = curves[curves["run"] == "a"].sort_values("step")
    assert ca["step"].tolist() == [1, 5, 10]
    np.testing.assert_allclose(ca["loss"], [4.8, np.nan, 3.0])  # eval loss only on eval steps
    np.testing.assert_allclose(ca["train_loss"], [4.9, 4.5, 4.0])
    assert ca["flops_6N"].tolist() == [6.0 * 1000 * 2000 * s for s in (1, 5, 10)]
    assert curves[curves["run"] == "d"]["step"].tolist() == [1, 5]  # truncated last line skipped


def test_single_run_directory(sweep_dir):
    runs, curves = load_runs(sweep_dir / "b")
    assert runs["run"].tolist() == ["b"] and len(curves) == 3


def test_prepare_excludes_unfinished_runs_with_a_warning_naming_them(sweep_dir):
    runs, curves = load_runs(sweep_dir)
    with pytest.warns(AnalysisWarning, match=r"\['c', 'd'\]"):
        pts = prepare(runs, curves)
    assert pts.points["run"].tolist() == ["a", "b"]
    assert pts.flops_convention == "6N+attention"
    assert set(pts.curves["run"]) == {"a", "b"} and pts.curves["loss"].notna().all()
    with pytest.warns(AnalysisWarning):
        pts6 = prepare(runs, curves, flops="6N", n_params="n_params_nonembed", exclude=["b"])
    assert pts6.points["flops"].tolist() == [6.0 * 1000 * 20000]


def test_fitting_runs_on_different_tokenizers_together_warns_naming_the_groups(sweep_dir):
    for name, tokenizer in (("a", "bytes"), ("b", "bpe")):
        vocab = 256 if tokenizer == "bytes" else 1024
        (sweep_dir / name / "config.yaml").write_text(
            f"data: {{source: 'builtin:english', tokenizer: {tokenizer}}}\nmodel: {{vocab_size: {vocab}}}\n")
    runs, curves = load_runs(sweep_dir)
    assert runs.set_index("run").loc["a", "data"] == "builtin:english bytes vocab=256"
    with pytest.warns(AnalysisWarning, match=r"different data or tokenizers.*bpe vocab=1024: 1 runs, e.g. \['b'\]"):
        prepare(runs, curves)
    (sweep_dir / "b" / "config.yaml").write_text((sweep_dir / "a" / "config.yaml").read_text())
    runs, curves = load_runs(sweep_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(runs, curves)
    assert not [w for w in caught if "different data" in str(w.message)]


def test_corrupt_metrics_line_is_an_error(sweep_dir):
    path = sweep_dir / "a" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(AnalysisError, match="metrics.jsonl:2"):
        load_runs(sweep_dir)


def test_nan_or_nonpositive_values_name_the_runs(sweep_dir):
    runs, curves = load_runs(sweep_dir)
    runs.loc[runs["run"] == "b", "final_eval_loss"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        with pytest.raises(AnalysisError, match=r"final_eval_loss must be finite and > 0; bad in 1 runs: \['b'\]"):
            prepare(runs, curves)
        runs.loc[runs["run"] == "b", "final_eval_loss"] = 3.0
        runs.loc[runs["run"] == "a", "tokens"] = 0
        with pytest.raises(AnalysisError, match=r"tokens .* \['a'\]"):
            prepare(runs, curves)


def test_minimal_table_and_flop_conventions(tmp_path):
    table = pd.DataFrame({"n_params_total": [1e8, 2e8, 4e8], "tokens": [2e9, 1e9, 5e8], "loss": [3.1, 3.0, 3.2]})
    path = tmp_path / "published.csv"
    table.to_csv(path, index=False)
    runs, curves = load_runs(path)
    assert runs["run"].tolist() == ["row0", "row1", "row2"] and (runs["status"] == "done").all()
    assert runs["final_eval_loss"].tolist() == [3.1, 3.0, 3.2]
    pts = prepare(runs, curves)  # no FLOP column: C = 6 N D
    assert pts.flops_convention == "6ND"
    np.testing.assert_allclose(pts.points["flops"], 6 * table["n_params_total"] * table["tokens"])
    # a bare "flops" column has no convention: the user must name it
    table.assign(flops=[1.3e18, 1.3e18, 1.3e18]).to_csv(tmp_path / "t.csv", index=False)
    runs, curves = load_runs(tmp_path / "t.csv")
    with pytest.raises(AnalysisError, match="no convention"):
        select_flops(runs, curves, "auto")
    conv, c, _ = select_flops(runs, curves, "6N+attention")
    assert conv == "6N+attention" and c.tolist() == [1.3e18] * 3


def test_parquet_table_loads_like_csv(tmp_path):
    pytest.importorskip("pyarrow")  # optional extra: pip install chinchax[parquet]
    table = pd.DataFrame({"run": ["x", "y"], "n_params_total": [1e8, 2e8], "tokens": [2e9, 1e9], "loss": [3.1, 3.0],
                          "flops_6N": [1.2e18, 1.2e18]})  # fmt: skip
    table.to_parquet(tmp_path / "t.parquet")
    runs, _ = load_runs(tmp_path / "t.parquet")
    assert runs["run"].tolist() == ["x", "y"] and runs["final_eval_loss"].tolist() == [3.1, 3.0]
    assert select_flops(runs, _, "auto")[0] == "6N"


def test_table_errors(tmp_path):
    mixed = pd.DataFrame({"run": ["x", "y", "z"], "n_params_total": [1e8] * 3, "tokens": [1e9] * 3, "loss": [3.0] * 3,
                          "flops": [6e17] * 3, "flops_convention": ["6N", "6N", "6N+attention"]})  # fmt: skip
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(AnalysisError, match=r"mixed FLOP conventions.*\['z'\]"):
        load_runs(tmp_path / "mixed.csv")
    with pytest.raises(AnalysisError, match="no such file"):
        load_runs(tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no run directories"):
        load_runs(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(AnalysisError, match="table"):
        load_runs(tmp_path / "x.txt")
