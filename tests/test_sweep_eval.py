"""The sweep spec's eval section and fit kind: validation, and a finished run evaluated exactly once.

The run tests train a tiny real model (a few steps on a generated corpus) in a worker process,
so each launch costs a JAX start-up; together they take well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.tasks import get_task
from sweeps.runner import run_sweep
from sweeps.spec import EvalSpec, spec_from_dict

BASE = {"name": "ev", "grid": {"train.seed": [0]}}


def test_eval_section_parses():
    spec = spec_from_dict({**BASE, "eval": {"tasks": ["facts", "add3_reversed"], "shots": 4, "items": 50, "steps": [10]},
                           "fit": {"kind": "emergence", "options": {"n_params": "n_params_nonembed", "n_bootstrap": 1e2}}})  # fmt: skip
    assert spec.eval == EvalSpec(tasks=("facts", "add3_reversed"), shots=4, items=50, seed=0, steps=(10,))
    assert spec.fit.kind == "emergence" and spec.fit.options == {"n_params": "n_params_nonembed", "n_bootstrap": 100}
    assert spec_from_dict({**BASE, "fit": {}}).fit.kind == "scaling"  # the default keeps the Chinchilla fit
    spec = spec_from_dict({**BASE, "eval": {"tasks": ["recall", "facts"], "params": {"recall": {"n_pairs": 10}}}})
    assert spec.eval.params == {"recall": {"n_pairs": 10}}


def test_worker_evaluates_with_the_spec_params(tmp_path, monkeypatch):
    import llm.evaluation
    from sweeps.evals import evaluate_run

    (tmp_path / "result.json").write_text(json.dumps({"status": "done", "step": 8}))
    calls = []
    monkeypatch.setattr(llm.evaluation, "evaluate_tasks", lambda run_dir, tasks, shots, **kw: calls.append((tasks, kw)))
    ev = EvalSpec(tasks=("recall", "add1"), shots=1, steps=(4,), params={"recall": {"n_pairs": 3}})
    assert evaluate_run(tmp_path, ev, log=lambda _: None) is None
    assert [(tasks, kw["step"], kw["params"]) for tasks, kw in calls] == [
        (["recall", "add1"], 4, {"recall": {"n_pairs": 3}}), (["recall", "add1"], 8, {"recall": {"n_pairs": 3}})]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"eval": {"tasks": ["fact"]}}, "eval.tasks: unknown task 'fact' (did you mean 'facts'?)"),
        ({"eval": {"tasks": []}}, "eval.tasks is empty"),
        ({"eval": {"tasks": ["facts", "facts"]}}, "eval.tasks lists a task twice"),
        ({"eval": {"tasks": ["facts"], "shots": -1}}, "eval.shots must be an integer >= 0, got -1"),
        ({"eval": {"tasks": ["facts"], "items": 0}}, "eval.items must be an integer >= 1, got 0"),
        ({"eval": {"tasks": ["facts"], "steps": [0]}}, "eval.steps: expected training steps"),
        ({"eval": {"tasks": ["facts"], "sots": 1}}, "unknown config key 'eval.sots' (did you mean 'shots'?)"),
        ({"eval": {"tasks": ["facts"], "params": {"fact": {"n_keys": 9}}}},
         "eval.params: 'fact' is not among the tasks evaluated (facts) (did you mean 'facts'?)"),
        ({"eval": {"tasks": ["facts"], "params": {"facts": {"n_key": 9}}}},
         "eval.params: task 'facts' has no parameter 'n_key' (did you mean 'n_keys'?)"),
        ({"eval": {"tasks": ["facts"], "params": {"facts": 9}}}, "eval.params.facts: expected a mapping, got 9"),
        ({"eval": {"tasks": ["recall"], "params": {"recall": {"n_pairs": 99}}}}, "eval.params: task 'recall'"),
        ({"fit": {"kind": "emergence"}}, "fit.kind=emergence scores the runs' evaluations: add an eval section"),
        ({"fit": {"kind": "emerge"}}, "fit.kind='emerge' is not allowed (did you mean 'emergence'?)"),
        ({"eval": {"tasks": ["facts"]}, "fit": {"kind": "emergence", "options": {"laws": ["x"]}}},
         "unknown config key 'fit.options.laws'; fit options of kind emergence are keyword arguments"),
        ({"eval": {"tasks": ["facts"]}, "fit": {"kind": "emergence", "options": {"n_params": "N"}}},
         "fit.options.n_params='N' is not allowed"),
    ],
)  # fmt: skip
def test_eval_section_errors(extra, message):
    with pytest.raises(ConfigError) as err:
        spec_from_dict({**BASE, **extra})
    assert message in str(err.value)


# --------------------------------------------------------------------------- real tiny runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_corpus")
    path = root / "corpus.txt"
    path.write_text("\n\n".join(get_task("add1").pretraining_text(300, seed=0)))
    return path


def _spec(corpus: Path, cache: Path, **extra):
    return spec_from_dict({
        "name": "ev",
        "base": {
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "seq_len": 64, "vocab_size": 256},
            "data": {"source": f"text:{corpus}", "cache_dir": str(cache), "eval_fraction": 0.1},
            "optim": {"warmup_steps": 1},
            "train": {"batch_size": 4, "steps": 4, "eval_every": 4, "eval_tokens": 256, "log_every": 2,
                      "checkpoint_every": 2, "keep_checkpoints": 3, "tensorboard": False},
        },
        "grid": {"train.seed": [0]},
        **extra,
    })  # fmt: skip


def _launch(spec, out, **kw):
    lines: list[str] = []
    report = run_sweep(spec, out, parallel=1, progress=False, cache_dir=None, log=lines.append, **kw)
    return report, "\n".join(lines)


def test_finished_run_is_evaluated_once(tmp_path, corpus):
    spec = _spec(corpus, tmp_path / "cache", eval={"tasks": ["add1"], "shots": 1, "items": 4, "steps": [2]})
    out = tmp_path / "sweep"
    report, _ = _launch(spec, out)
    assert report.ok and len(report.trained) == 1 and not report.eval_failed
    run = out / report.rows[0]["name"]
    final, early = run / "evals" / "add1.step4.summary.json", run / "evals" / "add1.step2.summary.json"
    summary = json.loads(final.read_text())
    assert summary["shots"] == 1 and summary["n_items"] == 4 and summary["seed"] == 0
    assert early.exists()
    stamps = (final.stat().st_mtime_ns, early.stat().st_mtime_ns)
    trained_at = (run / "result.json").stat().st_mtime_ns

    # Re-running trains and evaluates nothing.
    report, said = _launch(spec, out)
    assert report.ok and report.trained == [] and "to evaluate only" not in said
    assert (final.stat().st_mtime_ns, early.stat().st_mtime_ns) == stamps

    # A missing evaluation (or other shots) is done by a worker that does not train again.
    early.unlink()
    report, said = _launch(spec, out)
    assert report.ok and report.trained == [] and "1 of them to evaluate only" in said
    assert early.exists() and final.stat().st_mtime_ns == stamps[0]
    assert (run / "result.json").stat().st_mtime_ns == trained_at


def test_failed_evaluation_is_recorded_and_retried_only_when_asked(tmp_path, corpus):
    bad = _spec(corpus, tmp_path / "cache", eval={"tasks": ["add1"], "shots": 1, "items": 4, "steps": [3]})
    out = tmp_path / "sweep"
    report, _ = _launch(bad, out)
    name = report.rows[0]["name"]
    assert report.rows[0]["status"] == "done" and not report.failed  # training is fine
    assert not report.ok and report.eval_failed and "no checkpoint at step 3" in report.eval_failed[0][1]
    assert (out / name / "evals" / "failed.json").exists()
    index = json.loads((out / "index.json").read_text())
    assert index["runs"][0]["error"].startswith("eval: ") and "no checkpoint at step 3" in index["runs"][0]["error"]

    report, said = _launch(bad, out)  # not retried without retry_failed
    assert report.trained == [] and "to evaluate" not in said and report.eval_failed

    good = _spec(corpus, tmp_path / "cache", eval={"tasks": ["add1"], "shots": 1, "items": 4, "steps": [2]})
    report, said = _launch(good, out, retry_failed=True)
    assert report.ok and "1 of them to evaluate only" in said
    assert not (out / name / "evals" / "failed.json").exists()
    assert (out / name / "evals" / "add1.step2.summary.json").exists()


def test_fit_kind_emergence_ends_in_the_emergence_report(tmp_path, corpus):
    spec = _spec(corpus, tmp_path / "cache", eval={"tasks": ["add1"], "shots": 1, "items": 4},
                 fit={"kind": "emergence", "options": {"n_bootstrap": 10, "figures_": False}})  # fmt: skip
    out = tmp_path / "sweep"
    report, said = _launch(spec, out)
    assert report.ok and report.fit_status == "done", report.fit_status
    assert (out / "emergence" / "emergence.md").exists() and (out / "emergence" / "emergence.json").exists()
    assert not (out / "fits.json").exists()  # no scaling-law fit
    assert f"{out}/emergence/emergence.md" in said
