"""emergence_path end to end on a fake sweep (figures, table, report) and on an external table."""

import json

import numpy as np
import pytest

from analysis.emergence_load import write_eval_records
from analysis.emergence_report import default_out_dir, emergence_path
from analysis.emergence_synthetic import fake_sweep, token_records, write_run
from analysis.load import AnalysisError, AnalysisWarning

CSV = """model,n_params,flops,task,metric,value,baseline
tiny,1e8,2e20,arith,exact_match,0.01,0
small,1e9,2e21,arith,exact_match,0.02,0
mid,1e10,2e22,arith,exact_match,0.05,0
big,1e11,2e23,arith,exact_match,0.40,0
"""


def test_emergence_path_on_a_sweep_writes_table_and_report(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", sizes=(2e3, 2e4, 2e5), seeds=(0, 1), n_items=16, checkpoints=(50,))
    result = emergence_path(sweep, n_bootstrap=50, figures_=False)
    out = default_out_dir(sweep)
    assert out == sweep / "emergence" and result["outputs"]["figures"] == []
    saved = json.loads((out / "emergence.json").read_text())
    assert saved["rule"] == result["rule"] and "baseline + 0.1" in saved["rule"]
    facts = {e["metric"]: e for e in saved["emergence"] if e["task"] == "facts"}
    assert facts["exact_match"]["n_params"]["status"] in ("emerges", "above at every scale")
    larger = {e["metric"] for e in saved["emergence"] if e["task"] == "larger"}
    assert {"exact_match", "mc_accuracy", "brier"} <= larger  # chance baselines of the 2-way choice
    assert [a["n_params"] for a in saved["accuracy"] if a["task"] == "facts"] == [2e3, 2e4, 2e5]
    assert {f["metric"] for f in saved["loss_thresholds"]} == {"exact_match", "mc_accuracy", "brier", "token_accuracy"}
    md = (out / "emergence.md").read_text()
    assert saved["rule"] in md and "| facts | exact_match |" in md and "## Loss thresholds" in md
    assert (out / "emergence_metrics.csv").read_text().startswith("source,run,model,")


def test_emergence_figures_are_written(tmp_path):
    # one task and one metric: every kind of figure, drawn as few times as possible (matplotlib is slow)
    sweep = fake_sweep(tmp_path / "sweep", sizes=(2e3, 2e4, 2e5), seeds=(0, 1), n_items=8, checkpoints=(50,),
                       tasks=("facts",))  # fmt: skip
    result = emergence_path(sweep, tmp_path / "out", n_bootstrap=20, metrics=["exact_match"])
    names = {p.split("/")[-1] for p in result["outputs"]["figures"]}
    for stem in ("emergence_flops_exact_match", "emergence_params_exact_match", "emergence_mirage",
                 "emergence_loss_exact_match", "emergence_steps"):  # fmt: skip
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 0 and (tmp_path / "out" / f"{stem}.pdf").stat().st_size > 0
    assert "emergence_mirage.png" in (tmp_path / "out" / "emergence.md").read_text()


def test_emergence_path_on_an_external_table_and_as_overlay(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text(CSV)
    result = emergence_path(path, figures_=False)
    assert default_out_dir(path) == tmp_path / "published_emergence"
    (row,) = result["emergence"]
    assert (row["task"], row["n_params"]["at"], row["flops"]["at"], row["n_params"]["last_below"]) == ("arith", 1e11, 2e23, 1e10)
    assert "| published.csv | arith | exact_match | 0 | > 0.1 | 1e+11 | 2e+23 | 1e+10 | emerges |" in (
        tmp_path / "published_emergence" / "emergence.md").read_text()  # fmt: skip
    run = write_run(tmp_path / "runs" / "r0", 1e4, 2e5, 0, {}, 3.0)
    write_eval_records(run, "arith", 100, token_records("arith", 8, 3, 0.9, np.random.default_rng(0)),
                       baseline={"exact_match": 0.0})  # fmt: skip
    with pytest.warns(AnalysisWarning, match="different conventions"):
        both = emergence_path(tmp_path / "runs", tmp_path / "both", overlay=[path], n_bootstrap=0, figures_=False)
    assert len(both["sources"]) == 2 and {e["source"] for e in both["emergence"]} == set(both["sources"])


def test_external_model_families_are_separate_series(tmp_path):
    path = tmp_path / "families.csv"
    path.write_text("family,model,n_params,flops,task,metric,value,baseline\n"
                    "A,a1,1e8,1e20,t,exact_match,0.0,0\nA,a2,1e9,1e21,t,exact_match,0.5,0\n"
                    "B,b1,1e8,1e20,t,exact_match,0.0,0\nB,b2,1e9,1e21,t,exact_match,0.05,0\n")  # fmt: skip
    result = emergence_path(path, figures_=False)
    by_family = {e["source"].rsplit("[", 1)[1].rstrip("]"): e["n_params"] for e in result["emergence"]}
    assert by_family["A"]["at"] == 1e9 and by_family["B"]["status"] == "not above"


def test_emergence_path_errors(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text(CSV)
    (tmp_path / "afile").write_text("")
    with pytest.raises(AnalysisError, match="is a file, not a folder"):
        emergence_path(path, tmp_path / "afile" / "out")
    with pytest.raises(AnalysisError, match=r"metrics \['brier'\] are not in the data"):
        emergence_path(path, metrics=["brier"], figures_=False)
