"""Loading evals/ records of fake sweeps and runs, and external task tables, into the tidy table."""

import json
import shutil

import pytest

from analysis.emergence_load import (
    COLUMNS,
    load_emergence,
    load_external_table,
    write_eval_records,
)
from analysis.emergence_synthetic import fake_sweep, write_run
from analysis.load import AnalysisError, AnalysisWarning


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return fake_sweep(tmp_path_factory.mktemp("sweep"), sizes=(2e3, 2e4, 2e5), seeds=(0, 1), n_items=16, checkpoints=(50,))


def test_load_sweep_directory(sweep):
    t = load_emergence(sweep, n_bootstrap=50)
    assert tuple(t.columns) == COLUMNS
    assert sorted(t["run"].unique()) == sorted(p.name for p in sweep.iterdir())
    assert set(t["task"]) == {"facts", "larger"} and set(t["step"]) == {50.0, 100.0}
    row = t[(t["run"] == "n20000_s1") & (t["task"] == "facts") & (t["metric"] == "exact_match")].set_index("step")
    assert row.loc[100.0, "final"] and not row.loc[50.0, "final"]
    assert row.loc[100.0, "seed"] == 1 and row.loc[100.0, "n_params"] == 2e4 and row.loc[100.0, "n_items"] == 16
    assert row.loc[100.0, "flops"] == 7.0 * 2e4 * 20 * 2e4  # 6N+attention preferred when every run has it
    assert row.loc[50.0, "flops"] == pytest.approx(7.0 * 2e4 * 20 * 2e4 / 2)  # from metrics.jsonl at step 50
    assert row.loc[50.0, "eval_loss"] == pytest.approx(5.0 - 0.5 * 4.0)  # logged eval loss at step 50
    assert row.loc[100.0, "baseline"] == 0.0  # from the summary
    assert row.loc[100.0, "ci_lo"] <= row.loc[100.0, "value"] <= row.loc[100.0, "ci_hi"]
    mc = t[(t["task"] == "larger") & (t["metric"] == "mc_accuracy")]
    assert (mc["baseline"] == 0.5).all()  # 2-way choices: chance level without a summary entry
    assert t["model"].nunique() == 3  # seeds of one size share the model label
    t6 = load_emergence(sweep, n_bootstrap=0, flops="6N")
    assert set(t6["flops_convention"]) == {"6N"}


def test_index_restricts_and_unfinished_runs_are_left_out(tmp_path):
    sweep = fake_sweep(tmp_path, sizes=(2e3, 2e4), seeds=(0,), n_items=4)
    (tmp_path / "index.json").write_text(json.dumps({"runs": [{"run_dir": "n2000_s0"}, {"run_dir": "n20000_s0"}]}))
    write_run(tmp_path / "stale", 5e3, 1e5, 0, {}, 3.0)  # not in the index
    with pytest.warns(AnalysisWarning, match="stale"):
        assert set(load_emergence(sweep, n_bootstrap=0)["run"]) == {"n2000_s0", "n20000_s0"}
    shutil.rmtree(tmp_path / "stale")
    result = json.loads((tmp_path / "n2000_s0" / "result.json").read_text())
    (tmp_path / "n2000_s0" / "result.json").write_text(json.dumps(result | {"status": "failed"}))
    with pytest.warns(AnalysisWarning, match=r"n2000_s0 \(status failed\)"):
        assert set(load_emergence(sweep, n_bootstrap=0)["run"]) == {"n20000_s0"}
    single = load_emergence(tmp_path / "n20000_s0", n_bootstrap=0)  # one run directory
    assert set(single["run"]) == {"n20000_s0"}


def test_bad_records_and_missing_evals(tmp_path):
    run = write_run(tmp_path / "r", 1e3, 1e4, 0, {}, 3.0)
    with pytest.raises(AnalysisError, match="no finished run with evals"), pytest.warns(AnalysisWarning):
        load_emergence(tmp_path)
    write_eval_records(run, "facts", 10, [{"target": "1", "output": "1", "target_tokens": [1], "token_correct": [True]}])
    with pytest.raises(AnalysisError, match=r"facts\.step10\.jsonl:1: record lacks target_logprob"):
        load_emergence(run)
    (run / "evals" / "facts.step10.jsonl").write_text('{"target": "1"\n')
    with pytest.raises(AnalysisError, match=r"facts\.step10\.jsonl:1: not valid JSON"):
        load_emergence(run)


CSV = """model,n_params,flops,task,metric,value,baseline,n_items
tiny,1e8,2e20,arith,exact_match,0.01,0,500
small,1e9,2e21,arith,exact_match,0.02,0,500
big,1e10,2e22,arith,exact_match,0.40,0,500
big,1e10,2e22,arith,token_accuracy,0.80,,500
"""


def test_external_table(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text(CSV)
    t = load_external_table(path)
    assert tuple(t.columns) == COLUMNS and len(t) == 4
    assert t["final"].all() and set(t["flops_convention"]) == {"external"}
    big = t[(t["model"] == "big") & (t["metric"] == "exact_match")].iloc[0]
    assert (big["n_params"], big["flops"], big["value"], big["baseline"], big["n_items"]) == (1e10, 2e22, 0.4, 0.0, 500)
    assert load_emergence(path)["value"].tolist() == t["value"].tolist()


@pytest.mark.parametrize(
    "text, message",
    [
        ("model,n_params,task,metric,value\nm,1e9,a,em,0.1\n", r"missing column\(s\) flops"),
        ("model,n_params,flops,task,metric,value\nm,-1,1e20,a,em,0.1\n", r"n_params must be a finite number > 0; bad on line\(s\) 2"),
        ("model,n_params,flops,task,metric,value\nm,1e9,1e20,a,em,high\n", r"value must be a finite number; bad on line\(s\) 2"),
        ("model,n_params,flops,task,metric,value\nm,1e9,1e20,a,em,0.1\nm,1e9,1e20,a,em,0.2\n", r"line\(s\) 2, 3 repeat"),
        ("model,n_params,flops,task,metric,value,baseline\nm,1e9,1e20,a,em,0.1,inf\n", "baseline must be a finite number"),
        ("model,n_params,flops,task,metric,value\n", "no rows"),
        ("model,n_params,flops,task,metric,value\n,1e9,1e20,a,em,0.1\n", r"model is empty on line\(s\) 2"),
    ],
)
def test_bad_external_tables(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(AnalysisError, match=message) as err:
        load_external_table(path)
    assert "\n" not in str(err.value)


def test_external_table_wrong_suffix_or_missing(tmp_path):
    with pytest.raises(AnalysisError, match="no such"):
        load_emergence(tmp_path / "nope.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(AnalysisError, match="expected a .csv/.tsv table"):
        load_emergence(tmp_path / "x.json")
