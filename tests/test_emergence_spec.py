"""experiments/emergence.yaml end to end with the real trainer, shortened to two tiny runs.

Same spec file as README's emergence command, overridden to two sizes, one seed, 20 steps and
8 evaluation items, so it takes well under a minute on 2 CPU cores: the runs are trained and
evaluated by their workers, and the sweep ends in the emergence report and figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.cli import main

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "emergence.yaml"
SHORT = [
    "grid.n_params=[1704,3516]",
    "grid.train.seed=[0]",
    "base.train.steps=20",
    "base.train.eval_every=10",
    "base.train.checkpoint_every=10",
    "base.train.log_every=10",
    "base.train.eval_tokens=1024",
    "base.optim.warmup_steps=2",
    "base.data.tasks.pool_tokens=20000",
    "eval.items=8",
    "fit.options.n_bootstrap=10",
]


@pytest.mark.slow
def test_emergence_spec_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHINCHAX_CACHE", str(tmp_path / "cache"))  # data and compile caches
    out = tmp_path / "emergence"
    assert main(["sweep", "run", str(SPEC), *SHORT, "--out", str(out), "--parallel", "2"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["counts"]["done"] == 2 and index["counts"]["failed"] == 0
    for row in index["runs"]:
        for task in ("facts", "add3_reversed"):
            summary = json.loads((out / row["name"] / "evals" / f"{task}.step20.summary.json").read_text())
            assert summary["shots"] == 2 and summary["n_items"] == 8
    report = json.loads((out / "emergence" / "emergence.json").read_text())
    assert report["tasks"] == ["add3_reversed", "facts"] and report["n_runs"] == 2
    assert (out / "emergence" / "emergence.md").exists()
    pngs = {p.name for p in (out / "emergence").glob("*.png")}
    assert "emergence_mirage.png" in pngs and "emergence_params_exact_match.png" in pngs
    assert any((out / "emergence").glob("*.pdf"))
    assert not (out / "fits.json").exists()  # fit kind emergence: no scaling-law fit
    capsys.readouterr()

    # Running it again trains and evaluates nothing.
    assert main(["sweep", "run", str(SPEC), *SHORT, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "0 trained by this launch" in err and "to evaluate only" not in err
