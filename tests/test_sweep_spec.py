"""Sweep specs: the shape recipe, plan expansion, isoflop budgets, validation, plan snapshots.

Snapshots of ``chinchax sweep plan`` for the shipped specs live in tests/snapshots/;
after an intended change, refresh them with CHINCHAX_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from llm.config import ConfigError, ModelConfig, tokens_per_step, total_steps
from llm.counting import flops_per_token, n_params
from sweeps.cli import main
from sweeps.plan import expand, format_plan
from sweeps.recipe import (
    Recipe,
    batch_size_for_params,
    depths_for_width,
    lr_for_params,
    n_heads_for,
    shape_for_params,
    shape_of_width,
)
from sweeps.spec import load_spec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
SHIPPED = ["quickstart", "chinchilla_isoflop", "kaplan_grid", "moe_vs_dense", "kaplan_grid_wsd"]
TINY = Recipe(aspect_ratio=32, head_dim=16, round_to=8)


# --------------------------------------------------------------------------- recipe


def test_heads_and_width_rule_by_hand():
    assert n_heads_for(64, 16) == 4  # head dim 16
    assert n_heads_for(40, 16) == 2  # 40/16 = 2.5 -> 2 heads of 20
    assert n_heads_for(24, 16) == 1  # one head of 24
    assert n_heads_for(48, 16) == 3
    # d_ff = 8/3 * 64 = 170.7 rounded up to a multiple of 8; depth = 64 / 32.
    assert shape_of_width(64, TINY) == {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 176}
    # Aspect ratio 32 +- factor 1.5: d_model/n_layers in [21.3, 48] -> 2 or 3 layers at width 64.
    assert depths_for_width(64, TINY) == [2, 3]
    assert depths_for_width(8, TINY) == [1]


def test_shape_rule_hits_hand_counted_size():
    # d=64, L=2, SwiGLU d_ff=176: per block 4*64^2 (attention) + 3*64*176 (MLP) + 2*64 (norms),
    # plus the final norm: 2 * (16384 + 33792 + 128) + 64 = 100672 non-embedding parameters.
    shape = shape_for_params(100672, ModelConfig(), TINY)
    assert shape == {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 176}


def test_shape_rule_is_closest_over_all_candidates():
    model = ModelConfig(vocab_size=256)
    for target in (3e3, 2e4, 7.7e4, 3e5, 1e6):
        shape = shape_for_params(target, model, TINY)
        got = n_params(ModelConfig(vocab_size=256, **shape))["n_params_nonembed"]
        for d in range(8, 513, 8):
            for depth in depths_for_width(d, TINY):
                other = n_params(ModelConfig(vocab_size=256, **{**shape_of_width(d, TINY), "n_layers": depth}))
                assert abs(math.log(got / target)) <= abs(math.log(other["n_params_nonembed"] / target)) + 1e-12
        if shape["n_layers"] > 1:  # one layer is the floor for widths below the aspect ratio
            assert 1 / 1.5 <= shape["d_model"] / shape["n_layers"] / 32 <= 1.5


def test_shape_rule_counts_total_and_rounds_for_gpus():
    recipe = Recipe(count="n_params_total")  # round_to 64, head dim 64, aspect 64
    shape = shape_for_params(1e8, ModelConfig(vocab_size=32000), recipe)
    assert shape["d_model"] % 64 == 0 and shape["d_ff"] % 64 == 0
    assert shape["d_model"] // shape["n_heads"] == 64
    total = n_params(ModelConfig(vocab_size=32000, **shape))["n_params_total"]
    assert 0.85 < total / 1e8 < 1.15


def test_lr_and_batch_rules():
    recipe = Recipe(lr_ref=2e-3, n_ref=1e6, lr_exponent=0.2, batch_tokens_ref=2**16, batch_exponent=0.5)
    assert lr_for_params(1e6, recipe) == pytest.approx(2e-3)
    assert lr_for_params(32e6, recipe) == pytest.approx(1e-3)  # 32^-0.2 = 1/2
    assert batch_size_for_params(4e6, 128, recipe) == 2**17 // 128  # 2^16 * 4^0.5 tokens
    assert batch_size_for_params(4e6, 128, Recipe()) is None  # no batch rule: keep the base batch


def test_recipe_rejects_bad_values():
    with pytest.raises(ConfigError, match="recipe.count"):
        Recipe(count="n_params")
    with pytest.raises(ConfigError, match="recipe.round_to must be even"):
        Recipe(round_to=7)


# --------------------------------------------------------------------------- expansion


def _tiny_base(**train):
    return {
        "model": {"vocab_size": 256, "seq_len": 32, "compute_dtype": "float32"},
        "train": {"batch_size": 8, **train},
    }


TINY_RECIPE = {"aspect_ratio": 32, "head_dim": 16, "round_to": 8}


def test_grid_is_a_cartesian_product_with_stable_names():
    spec = spec_from_dict({
        "name": "g",
        "base": _tiny_base(),
        "recipe": TINY_RECIPE,
        "grid": {"n_params": [1e4, 5e4], "train.tokens": [32768, 65536, 131072], "optim": {"weight_decay": [0.0, 0.1]}},
    })
    runs = expand(spec)
    assert len(runs) == 2 * 3 * 2
    assert len({r.name for r in runs}) == len(runs)
    assert [r.name for r in expand(spec)] == [r.name for r in runs]  # deterministic
    assert {r.tokens for r in runs} == {32768, 65536, 131072}
    assert {r.config.optim.weight_decay for r in runs} == {0.0, 0.1}
    first = runs[0]
    assert first.name.startswith("N") and "-D3.3e4-" in first.name
    assert first.steps == 32768 // (8 * 32) and first.config.train.progress is False


def test_recipe_lr_yields_to_explicit_values():
    base = _tiny_base(steps=10)
    spec = spec_from_dict({"name": "x", "base": base, "recipe": TINY_RECIPE, "grid": {"n_params": [1e4]}})
    (run,) = expand(spec)
    assert run.config.optim.lr == pytest.approx(lr_for_params(run.n_params, Recipe(**TINY_RECIPE)))
    base["optim"] = {"lr": 1e-3}
    spec = spec_from_dict({"name": "x", "base": base, "recipe": TINY_RECIPE, "grid": {"n_params": [1e4]}})
    assert expand(spec)[0].config.optim.lr == 1e-3
    spec = spec_from_dict({"name": "x", "base": base, "recipe": TINY_RECIPE, "grid": {"n_params": [1e4], "optim.lr": [5e-4]}})
    assert expand(spec)[0].config.optim.lr == 5e-4


def test_dataset_tokens_axis():
    spec = spec_from_dict({"name": "d", "base": _tiny_base(steps=5), "dataset_tokens": [1e5, 1e6]})
    runs = expand(spec)
    assert [r.config.data.dataset_tokens for r in runs] == [100000, 1000000]
    assert "dataset_tokens1e5" in runs[0].name


@pytest.mark.parametrize("convention", ["6N", "6N+attention"])
def test_isoflop_runs_land_within_one_percent(convention):
    spec = spec_from_dict({
        "name": "iso",
        "convention": convention,
        "base": _tiny_base(),
        "recipe": TINY_RECIPE,
        "isoflop": {"budgets": [1e11, 1e12], "n_sizes": 3, "spread": 3.0},
    })
    runs = expand(spec)
    assert len(runs) == 6
    for run in runs:
        cfg = run.config
        flops = flops_per_token(cfg.model, convention) * total_steps(cfg) * tokens_per_step(cfg)
        assert abs(flops / run.budget - 1) <= 0.01, run.name
        assert flops == pytest.approx(run.flops)
    sizes = [r.n_params for r in runs if r.budget == 1e12]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "data, message",
    [
        ({"gird": {}}, "unknown config key 'gird' \\(did you mean 'grid'\\?\\)"),
        ({"grid": {"model.d_modle": [64]}}, "did you mean 'model.d_model'"),
        ({"grid": {"optim.lr": []}}, "grid.optim.lr is empty"),
        ({"grid": {"optim.lr": 0.1}}, "expected a list"),
        ({"recipe": {"aspect": 3}}, "unknown config key 'recipe.aspect'"),
        ({"base": {"train": {"steps": 0, "tokens": None}}}, "train.steps must be > 0"),
        ({"base": {"model": {"d_modle": 8}}}, "did you mean 'd_model'"),
        ({"convention": "6ND"}, "convention='6ND' is not allowed"),
        ({"isoflop": {"budgets": [], "n_sizes": 3}}, "isoflop.budgets is empty"),
        ({"isoflop": {"budgets": [1e12]}}, "exactly one of n_params"),
        ({"isoflop": {"budgets": [1e12], "n_sizes": 3}, "grid": {"train.tokens": [1e6]}}, "isoflop solves for"),
        ({"dataset_tokens": []}, "dataset_tokens is empty"),
        ({"isoflop": {"budget": [1e12]}}, "unknown config key 'isoflop.budget' \\(did you mean 'budgets'\\?\\)"),
        ({"fit": {"options": {"n_bootstrp": 10}}}, "unknown config key 'fit.options.n_bootstrp' \\(did you mean 'n_bootstrap'"),
    ],
)
def test_spec_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict({"name": "bad", **data})


# Specs that used to pass `sweep plan` and fail only when run (or with a traceback).
@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"optim": {}}}, "grid is empty"),
        ({"name": "a\x00b"}, "name: a sweep needs a plain folder name"),
        ({"name": "two\nlines"}, "name: a sweep needs a plain folder name"),
        ({"base": {"data": {"source": "text:/nonexistent/chinchax/*.txt"}}}, "base: data.source text:/nonexistent/chinchax/*.txt: no file"),
        ({"base": {"data": {"source": "text:/nonexistent/chinchax.txt"}}}, "file not found"),
        ({"base": {"data": {"source": "builtin:englsh"}}}, "base: data.source: unknown builtin corpus 'builtin:englsh' (did you mean 'builtin:english'?)"),
        ({"grid": {"data.source": ["builtin:kjv", "synthetic:markv"]}}, "grid: data.source: unknown synthetic source 'synthetic:markv'"),
        ({"grid": {"n_params": [1e4, float("nan")]}}, "grid.n_params: sizes must be finite numbers > 0"),
        ({"isoflop": {"budgets": [1e12], "n_params": [float("nan")]}}, "sizes must be positive numbers"),
        ({"isoflop": {"budgets": [float("inf")], "n_sizes": 3}}, "isoflop.budgets[0]: expected a finite number"),
        ({"fit": {"options": {"n_bootstrap": -5}}}, "fit.options.n_bootstrap must be an integer >= 0, got -5"),
        ({"fit": {"options": {"n_bootstrap": 1.5}}}, "fit.options.n_bootstrap must be an integer >= 0, got 1.5"),
        ({"fit": {"options": {"seed": -1}}}, "fit.options.seed must be an integer >= 0"),
        ({"fit": {"options": {"approaches": ["2", "4"]}}}, "fit.options.approaches: '4' is not allowed; choose from 1, 2, 3"),
        ({"fit": {"options": {"laws": ["kaplan_N", "kaplan_X"]}}}, "fit.options.laws: unknown law 'kaplan_X'"),
        ({"fit": {"options": {"laws": "kaplan_N"}}}, "fit.options.laws: expected a list"),
        ({"fit": {"options": {"flops": "6N+atention"}}}, "fit.options.flops='6N+atention' is not allowed (did you mean '6N+attention'?)"),
        ({"fit": {"options": {"interpolate": "sometimes"}}}, "fit.options.interpolate='sometimes' is not allowed"),
        ({"fit": {"options": {"loss": "eval_loss"}}}, "fit.options.loss='eval_loss' is not allowed"),
        ({"fit": {"options": {"n_params": "n_params_embed"}}}, "fit.options.n_params='n_params_embed' is not allowed"),
        ({"fit": {"options": {"budgets": [1e21, -1]}}}, "fit.options.budgets: expected a non-empty list of finite numbers > 0"),
        ({"fit": {"options": {"budgets": []}}}, "fit.options.budgets: expected a non-empty list"),
        ({"fit": {"options": {"isoflop_budgets": "1e21"}}}, "fit.options.isoflop_budgets: expected a non-empty list"),
        ({"fit": {"options": {"holdout_flops": 0}}}, "fit.options.holdout_flops must be a finite number > 0"),
        ({"fit": {"options": {"percentiles": [90, 10]}}}, "fit.options.percentiles: expected [low, high] with 0 <= low < high <= 100"),
        ({"fit": {"options": {"extrapolation": "yes"}}}, "fit.options.extrapolation: expected true or false"),
        ({"fit": {"options": {"exclude": "run-1"}}}, "fit.options.exclude: expected a list of run names"),
        ({"fit": {"options": {"out_dir": 3}}}, "fit.options.out_dir: expected a folder path"),
    ],
)
def test_specs_that_cannot_run_are_refused_at_load(data, fragment):
    with pytest.raises(ConfigError) as err:
        spec_from_dict({"name": "bad", **data})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_good_fit_options_and_sources_pass_normalised(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    spec = spec_from_dict({
        "name": "ok",
        "base": {"data": {"source": f"text:{tmp_path}/*.txt"}},
        "grid": {"data.source": ["builtin:kjv", "synthetic:markov", "tfds:lm1b"]},
        "fit": {"options": {"approaches": [2, "3"], "laws": ["kaplan_N+E", "chinchilla"], "budgets": [1e21],
                            "n_bootstrap": 1e3, "seed": 0, "percentiles": [5, 95], "flops": "6ND", "exclude": ["r1"],
                            "extrapolation": False, "holdout_flops": 1e18}},
    })
    options = spec.fit.options
    assert options["approaches"] == ("2", "3") and options["n_bootstrap"] == 1000 and isinstance(options["n_bootstrap"], int)
    assert options["budgets"] == (1e21,) and options["percentiles"] == (5.0, 95.0) and options["exclude"] == ("r1",)


def test_empty_grid_is_fine_beside_another_axis():
    spec = spec_from_dict({"name": "d", "base": _tiny_base(steps=5), "grid": {}, "dataset_tokens": [1e5]})
    assert len(expand(spec)) == 1


def test_cli_plan_refuses_a_missing_data_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {{data: {{source: 'text:{tmp_path}/missing/*.txt'}}}}\n")
    assert main(["sweep", "plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing/*.txt: no file matches" in err and err.count("\n") == 1
    assert main(["sweep", "plan", str(EXPERIMENTS / "quickstart.yaml"), "name=a\x00b"]) == 2
    assert "plain folder name" in capsys.readouterr().err


def test_expansion_errors():
    too_small = {"name": "s", "base": _tiny_base(), "recipe": TINY_RECIPE, "isoflop": {"budgets": [1e8], "n_params": [1e5]}}
    with pytest.raises(ConfigError, match="too small"):
        expand(spec_from_dict(too_small))
    dup = {"name": "s", "base": _tiny_base(steps=3), "recipe": TINY_RECIPE, "grid": {"n_params": [1.0e4, 1.01e4]}}
    with pytest.raises(ConfigError, match="duplicate runs"):
        expand(spec_from_dict(dup))
    clash = {"name": "s", "base": _tiny_base(steps=3), "grid": {"n_params": [1e4], "model.d_model": [64]}}
    with pytest.raises(ConfigError, match="recipe chooses the shape"):
        expand(spec_from_dict(clash))


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_snapshot(name):
    spec = load_spec(EXPERIMENTS / f"{name}.yaml")
    text = format_plan(spec, expand(spec)) + "\n"
    path = SNAPSHOTS / f"plan_{name}.txt"
    if os.environ.get("CHINCHAX_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}; run with CHINCHAX_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()


def test_cli_plan_and_errors(tmp_path, capsys):
    assert main(["sweep", "plan", str(EXPERIMENTS / "quickstart.yaml"), "isoflop.budgets=[1e11]"]) == 0
    out = capsys.readouterr().out
    assert out.count("C1e11-") == 4 and "4 runs" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {optim.lr: []}\n")
    assert main(["sweep", "plan", str(bad)]) == 2
    assert "grid.optim.lr is empty" in capsys.readouterr().err
    assert main(["sweep", "run", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_cli_overrides_after_options(tmp_path, capsys):
    spec = str(EXPERIMENTS / "quickstart.yaml")
    assert main(["sweep", "status", spec, "--out", str(tmp_path / "sw"), "isoflop.budgets=[1e11]"]) == 0
    assert "4 runs: 4 pending" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # anything else unknown is still an argparse error
        main(["sweep", "status", spec, "--out", str(tmp_path / "sw"), "--bogus"])
    for bad in (["--parallel", "0"], ["--parallel", "-1"], ["--gpus-per-run", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", "run", spec, "--out", str(tmp_path / "bad"), *bad])
        assert exit_.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # rejected before the sweep directory is written


def test_help_examples_name_files_that_exist(capsys):
    import re

    for command in (["train"], ["sweep"], ["fit"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        for path in re.findall(r"experiments/[\w/.-]+\.yaml", text):
            assert (REPO / path).is_file(), f"`chinchax {command[0]} --help` names missing {path}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "bootstrap seed (default: 0)" in capsys.readouterr().out


def test_run_names_survive_new_default_fields():
    import dataclasses

    from llm.config import Config, MoEConfig
    from sweeps.plan import config_changes, config_hash

    cfg = Config()
    moe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=MoEConfig(n_experts=4)))
    assert config_changes(moe, Config()) == {"model.moe": "on", "model.moe.n_experts": 4}
    assert config_hash(cfg) != config_hash(moe)
    quiet = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    assert config_hash(quiet) == config_hash(cfg)  # cosmetic
    # Only changed values are hashed, so a field added later with its default keeps the name.
    assert config_changes(cfg, Config()) == {}


def test_docstring_example_spec_is_valid():
    import yaml

    from sweeps import spec as spec_module

    doc = spec_module.__doc__
    data = spec_module._numbers(yaml.safe_load(doc[doc.index("Example::") + len("Example::") :]))
    runs = expand(spec_from_dict(data))
    assert len(runs) == 2 * 3 * 2  # budgets x sizes x seeds
    assert all(r.config.data.dataset_tokens == 10**7 for r in runs)
