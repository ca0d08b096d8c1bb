"""Run identity: a run's name covers every config value that can change its numbers.

Names hash the differences from a frozen record of the defaults (sweeps.plan.IDENTITY_BASELINE),
so a default changed in code gives new names (an old "done" run is not reused), while the
names of today's specs stay as they are.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from llm.config import Config, ConfigError, MoEConfig, OptimConfig, TaskMixConfig
from sweeps.plan import COSMETIC_KEYS, IDENTITY_BASELINE, expand, flat_config
from sweeps.spec import load_spec

REPO = Path(__file__).resolve().parent.parent

# The names `chinchax sweep plan experiments/quickstart.yaml` printed before identity was
# frozen: they must not change, or every finished quickstart run would be retrained.
QUICKSTART_NAMES = [
    "C1e11-N3376-D1.2e6-71e848da", "C1e11-N6984-D7.5e5-1aa6508a", "C1e11-N1.3e4-D5e5-d07d8758",
    "C1e11-N2.8e4-D2.8e5-78fb11a1", "C3e11-N6984-D2.2e6-e4be278f", "C3e11-N1.3e4-D1.5e6-519c38cd",
    "C3e11-N2.8e4-D8.5e5-5e04bd5f", "C3e11-N7.6e4-D4.2e5-9c307b2a", "C1e12-N1.3e4-D5e6-2df69e34",
    "C1e12-N2.8e4-D2.8e6-e78d1887", "C1e12-N5.6e4-D1.8e6-571d04ce", "C1e12-N1.5e5-D8e5-586e01f6",
]  # fmt: skip


def _patch_default(monkeypatch, section: str, cls: type, field: str, value) -> None:
    """Change a config default the way an edit of llm/config.py would (dataclass field + __init__)."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    monkeypatch.setattr(fields[names.index(field)], "default", value)
    monkeypatch.setattr(cls, field, value)
    defaults = list(cls.__init__.__defaults__)
    defaults[len(defaults) - len(names) + names.index(field)] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))
    # Config() holds a default instance of each section: rebuild it under the new default.
    top = dataclasses.fields(Config)
    top_names = [f.name for f in top]
    monkeypatch.setattr(top[top_names.index(section)], "default", cls())
    monkeypatch.setattr(Config, section, cls())
    top_defaults = list(Config.__init__.__defaults__)
    top_defaults[top_names.index(section)] = cls()
    monkeypatch.setattr(Config.__init__, "__defaults__", tuple(top_defaults))


def test_quickstart_names_are_unchanged():
    names = [r.name for r in expand(load_spec(REPO / "experiments" / "quickstart.yaml"))]
    assert names == QUICKSTART_NAMES


def test_a_changed_default_gives_new_run_names(monkeypatch):
    spec = load_spec(REPO / "experiments" / "quickstart.yaml")
    before = [r.name for r in expand(spec)]
    _patch_default(monkeypatch, "optim", OptimConfig, "b2", 0.99)
    assert Config().optim.b2 == 0.99 and OptimConfig().b2 == 0.99  # the patch took
    after = expand(spec)
    assert all(r.config.optim.b2 == 0.99 for r in after)
    assert not set(before) & {r.name for r in after}


def test_a_done_run_trained_under_an_old_default_is_not_reused(monkeypatch, tmp_path):
    loader = importlib.util.spec_from_file_location("sweep_runner_tests", REPO / "tests" / "test_sweep_runner.py")
    runner_tests = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(runner_tests)
    spec = runner_tests._spec([1])
    first = runner_tests._run(spec, tmp_path, parallel=1)
    assert first.trained and first.rows[0]["status"] == "done"
    _patch_default(monkeypatch, "optim", OptimConfig, "b2", 0.99)
    second = runner_tests._run(spec, tmp_path, parallel=1)
    assert second.trained == [second.rows[0]["name"]] != first.trained  # trained again, in a new folder
    assert "b2: 0.99" in (tmp_path / second.trained[0] / "config.yaml").read_text()


def test_a_changed_moe_default_renames_moe_runs_only():
    from sweeps.plan import config_hash

    dense = Config()
    moe = dataclasses.replace(dense, model=dataclasses.replace(dense.model, moe=MoEConfig(top_k=2)))
    # e.g. model.moe.top_k's default becoming 1: MoE runs are new runs, dense ones keep their names
    top1 = dataclasses.replace(dense, model=dataclasses.replace(dense.model, moe=MoEConfig(top_k=1)))
    assert config_hash(top1) != config_hash(moe)
    assert "model.moe.top_k" not in flat_config(dense)


def test_the_moe_kernel_is_how_a_run_executes_not_what_it_is():
    """Dispatch kernels compute the same function: "auto" picks one per platform, so a run
    planned on a laptop and resumed on a GPU keeps its name and its config check."""
    from sweeps.plan import config_hash

    base = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, moe=MoEConfig()))
    names = {
        config_hash(dataclasses.replace(base, model=dataclasses.replace(base.model, moe=MoEConfig(grouped_matmul=k))))
        for k in ("auto", "ragged_dot", "blocked")
    }
    assert len(names) == 1


def test_resuming_with_another_moe_kernel_passes_the_config_check(tmp_path):
    from llm.config import dump_config
    from llm.training import _check_same_config

    base = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, moe=MoEConfig(grouped_matmul="ragged_dot")))
    (tmp_path / "config.yaml").write_text(dump_config(base))
    _check_same_config(tmp_path, dataclasses.replace(base, model=dataclasses.replace(base.model, moe=MoEConfig(grouped_matmul="auto"))))
    with pytest.raises(ConfigError, match="different config"):
        _check_same_config(tmp_path, dataclasses.replace(base, model=dataclasses.replace(base.model, moe=MoEConfig(top_k=1))))


def test_baseline_records_every_config_key():
    on = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, moe=MoEConfig()),
                             data=dataclasses.replace(Config().data, tasks=TaskMixConfig()))
    keys = set(flat_config(on)) | {"model.moe", "data.tasks"}
    missing = sorted(keys - set(IDENTITY_BASELINE) - COSMETIC_KEYS)
    assert not missing, (
        f"config keys {missing} are not in sweeps.plan.IDENTITY_BASELINE: add each with the value that "
        "reproduces runs trained before it existed (else every run name changes)"
    )
