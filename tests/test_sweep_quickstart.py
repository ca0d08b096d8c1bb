"""The quickstart spec end to end with the real trainer, shortened to six tiny runs.

Same spec file as README's first command, overridden to two small budgets x three sizes (six runs: the fewest
Approach 3 accepts)
and a short evaluation, so it takes well under a minute on 2 CPU cores: runs, index,
fits.json, figures and report.md appear; a second launch trains nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sweeps.cli import main

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
SHORT = [
    "isoflop.budgets=[4e9,8e9]",
    "isoflop.n_params=[3e3,8e3,2e4]",
    "isoflop.tolerance=0.05",
    "base.train.eval_tokens=2048",
    "base.train.eval_every=50",
    "base.optim.warmup_steps=5",
    "fit.options.n_bootstrap=20",
]


@pytest.mark.slow
def test_quickstart_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHINCHAX_CACHE", str(tmp_path / "cache"))  # data and compile caches
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the test session's (conftest): use the sweep's own
    # the one end-to-end test compiled as users compile: without conftest's fast-compile flag
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    out = tmp_path / "quickstart"
    assert main(["sweep", "run", str(SPEC), *SHORT, "--out", str(out), "--parallel", "2"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["counts"]["done"] == 6 and index["counts"]["failed"] == 0
    for row in index["runs"]:
        result = json.loads((out / row["name"] / "result.json").read_text())
        assert result["status"] == "done" and result["run_name"] == row["name"]
        assert abs(result["flops"]["6N+attention"] / row["budget"] - 1) <= 0.05
        assert (out / row["name"] / "metrics.jsonl").exists()
    assert (out / "fits.json").exists() and (out / "report.md").exists()
    assert any(p.suffix == ".png" for p in out.rglob("*.png"))
    assert list((tmp_path / "cache" / "jax").iterdir())  # the persistent compilation cache is used
    capsys.readouterr()

    # Running it again trains nothing and still succeeds.
    assert main(["sweep", "run", str(SPEC), *SHORT, "--out", str(out), "--no-fit"]) == 0
    assert "0 trained by this launch" in capsys.readouterr().err
    assert main(["sweep", "status", str(SPEC), *SHORT, "--out", str(out)]) == 0
    assert "6 done" in capsys.readouterr().out
