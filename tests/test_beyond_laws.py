"""Laws beyond Chinchilla: data-constrained (Muennighoff 2023), over-training (Gadre 2024), allocate."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError, allocate, beyond, data_constrained, overtraining, parametric, references
from analysis.api import fit_path, plot_path
from sweeps.cli import main


def test_data_constrained_matches_the_paper_check_value():
    p = references.MUENNIGHOFF2023
    n, d, u = 6.34e9, 242e9, 25e9
    # by hand: G = (alpha A / (beta B))^(1/(alpha+beta)); U_N = G (G U_D)^(beta/alpha) (D_opt(C) = U_D solved for N_opt)
    g = (520.8 / 1487.7) ** (1 / (2 * 0.35266))
    u_n = g * g * u
    d_eff = u + u * 15.39 * (1 - math.exp(-(d / u - 1) / 15.39))
    n_eff = u_n + u_n * 5.31 * (1 - math.exp(-(n / u_n - 1) / 5.31))
    by_hand = 1.8691 + 520.8 / n_eff**0.35266 + 1487.7 / d_eff**0.35266
    assert data_constrained.predict(p, n, d, u) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(2.2256, abs=5e-5)  # the value the paper quotes


def test_data_constrained_without_repetition_is_chinchilla():
    p = references.MUENNIGHOFF2023
    # a small model (N below U_N) on fresh data: D' = D and N' = N
    n, d = 1e8, 5e10
    assert data_constrained.predict(p, n, d, 1e12) == pytest.approx(parametric.predict(p, n, d), rel=1e-12)
    # repeating the same D from a smaller pool is worth less
    assert data_constrained.predict(p, n, d, 5e9) > data_constrained.predict(p, n, d, 1e12)


TRUTH_DC = {"E": 1.5, "A": 50.0, "B": 300.0, "alpha": 0.35, "beta": 0.35, "R_D_star": 5.0, "R_N_star": 3.0}


@pytest.fixture(scope="module")
def dc_table(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = np.repeat([1e4, 3e4, 1e5], 10)
    d = np.tile(np.repeat([1e5, 3e5, 1e6, 3e6, 1e7], 2), 3)
    u = np.tile([1e5, 1e6] * 5, 3)
    loss = data_constrained.predict(TRUTH_DC, n, d, u) * np.exp(rng.normal(0, 0.002, n.size))
    table = pd.DataFrame({"n_params_total": n, "tokens": d, "dataset_tokens": u, "loss": loss})
    path = tmp_path_factory.mktemp("dc") / "dc.csv"
    table.to_csv(path, index=False)
    return path, table


@pytest.fixture(scope="module")
def dc_fitted(dc_table, tmp_path_factory):
    """`chinchax fit TABLE --law data_constrained` (figures drawn separately: the others are slow and not ours)."""
    out = tmp_path_factory.mktemp("dc_out")
    rc = main(["fit", str(dc_table[0]), "--law", "data_constrained", "--approach", "none", "--flops", "6ND",
               "--bootstrap", "3", "--no-extrapolation", "--no-figures", "--quiet", "--out-dir", str(out)])  # fmt: skip
    assert rc == 0
    return out, json.loads((out / "fits.json").read_text())


def test_data_constrained_fit_recovers_a_known_law(dc_fitted):
    res = dc_fitted[1]["beyond"]["data_constrained"]
    assert res["params"]["R_D_star"] == pytest.approx(5.0, rel=0.15)
    assert res["params"]["E"] == pytest.approx(1.5, rel=0.05)
    assert res["params"]["alpha"] == pytest.approx(0.35, abs=0.03)
    assert res["rmse_log_loss"] < 0.003
    assert res["intervals"]["R_D_star"]["n"] == 3  # bootstrap refits


def test_data_constrained_report_and_figure(dc_fitted, tmp_path):
    out, fits = dc_fitted
    assert "## Repeated data" in (out / "report.md").read_text()
    paths = beyond.draw_all(fits, tmp_path)
    assert sorted(Path(p).name for p in paths) == ["data_constrained.pdf", "data_constrained.png"]


def test_data_constrained_names_the_missing_column(dc_table, tmp_path):
    _, t = dc_table
    path = tmp_path / "no_pool.csv"
    t.drop(columns="dataset_tokens").to_csv(path, index=False)
    with pytest.raises(AnalysisError, match="dataset_tokens"):
        fit_path(path, tmp_path / "o", approaches=(), laws=("data_constrained",), flops="6ND", n_bootstrap=0,
                 extrapolation=False, progress=False)  # fmt: skip
    assert not (tmp_path / "o").exists()  # nothing written


TRUTH_OT = {"E": 1.5, "a": 100.0, "b": 200.0, "eta": 0.1}


def test_overtraining_law_by_hand():
    c, m = 1e20, 80.0
    expected = 1.5 + (100.0 * 80.0**0.1 + 200.0 * 80.0**-0.1) * 1e20**-0.1
    assert overtraining.predict(TRUTH_OT, c, m) == pytest.approx(expected, rel=1e-12)
    assert overtraining.optimal_multiplier(TRUTH_OT) == pytest.approx(2.0**5)  # (b/a)^(1/(2 eta))
    assert overtraining.loss_penalty(TRUTH_OT, 20.0, c) == 0.0
    # the compute factor is the compute at which the M run matches the M = 20 run's loss
    factor = overtraining.compute_factor(TRUTH_OT, m)
    assert overtraining.predict(TRUTH_OT, c * factor, m) == pytest.approx(overtraining.predict(TRUTH_OT, c, 20.0), rel=1e-12)
    # Chinchilla's law with alpha = beta = 2 eta, A = a 6^-eta, B = b 6^-eta, at C = 6 N D, M = D / N
    n, d = 3e8, 2e10
    chin = {"E": 1.5, "A": 100.0 * 6**-0.1, "B": 200.0 * 6**-0.1, "alpha": 0.2, "beta": 0.2}
    assert overtraining.predict(TRUTH_OT, 6 * n * d, d / n) == pytest.approx(parametric.predict(chin, n, d), rel=1e-12)


@pytest.fixture(scope="module")
def ot_table(tmp_path_factory):
    rng = np.random.default_rng(1)
    c = np.repeat([1e15, 1e16, 1e17], 7)
    m = np.tile([5.0, 10, 20, 40, 80, 160, 320], 3)
    n = np.sqrt(c / (6 * m))
    loss = overtraining.predict(TRUTH_OT, c, m) * np.exp(rng.normal(0, 0.001, c.size))
    path = tmp_path_factory.mktemp("ot") / "ot.csv"
    pd.DataFrame({"n_params_total": n, "tokens": m * n, "loss": loss}).to_csv(path, index=False)
    return path


def test_fit_cli_overtraining_recovers_the_law(ot_table, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["fit", str(ot_table), "--law", "overtraining", "--approach", "none", "--flops", "6ND", "--bootstrap", "3",
               "--no-extrapolation", "--no-figures", "--quiet", "--out-dir", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "fits.json").read_text())["beyond"]["overtraining"]
    assert res["params"]["eta"] == pytest.approx(0.1, abs=0.01)
    assert res["penalty"]["M_opt"] == pytest.approx(32.0, rel=0.15)
    assert "overtraining: E = " in capsys.readouterr().out
    assert "## Over-training" in (out / "report.md").read_text()
    fits = json.loads((out / "fits.json").read_text())
    assert [Path(p).name for p in beyond.draw_all(fits, tmp_path)] == ["overtraining.png", "overtraining.pdf"]


def test_allocate_compute_optimal_matches_the_closed_form():
    rows, _ = allocate.allocate("hoffmann2022", budgets=[1e21, 1e24])
    n, d = parametric.compute_optimal(references.CHINCHILLA_APPROACH3, [1e21, 1e24])
    assert [r["n_params"] for r in rows] == pytest.approx(n.tolist(), rel=1e-6)
    assert [r["tokens"] for r in rows] == pytest.approx(d.tolist(), rel=1e-6)


def test_allocate_inference_trades_size_for_tokens():
    target = 2.0
    (plain,), _ = allocate.allocate("besiroglu2024", losses=[target])
    (served,), _ = allocate.allocate("besiroglu2024", losses=[target], inference_tokens=1e13)
    assert plain["compute_saved"] == pytest.approx(0.0, abs=1e-9)
    assert served["n_params"] < plain["n_params"] and served["tokens_per_param"] > plain["tokens_per_param"]
    assert served["compute_saved"] > 0
    p = references.EPOCH_APPROACH3
    assert parametric.predict(p, served["n_params"], served["tokens"]) == pytest.approx(target, rel=1e-9)

    def total(n):  # least 6 N D + 2 N T on the iso-loss curve: neighbours cost more
        d = (p["B"] / (target - p["E"] - p["A"] / n ** p["alpha"])) ** (1 / p["beta"])
        return 6 * n * d + 2 * n * 1e13

    assert total(served["n_params"]) < min(total(served["n_params"] * 1.02), total(served["n_params"] / 1.02))


def test_allocate_cli_json_and_bounds(capsys):
    assert main(["allocate", "muennighoff2023", "--budgets", "1e22", "--unique-tokens", "1e10", "--loss", "2.3",
                 "--inference-tokens", "1e12", "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert {"flops", "n_params", "tokens", "tokens_per_param", "loss"} <= set(rows[0])
    assert "inference_tokens" not in rows[0] and rows[1]["inference_tokens"] == 1e12
    assert rows[0]["tokens"] > 1e10 and rows[0]["compute_saved"] > 0  # repeats its data; beats the blind allocation
    assert main(["allocate", "hoffmann2022", "--loss", "1.6"]) == 2
    assert "1.69" in capsys.readouterr().err  # names the bound E
    assert main(["allocate", "hoffmann2022", "--budgets", "1e21", "--unique-tokens", "1e10"]) == 2
    assert "data-constrained" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lr_table(tmp_path_factory):
    """3 budgets x lr x batch grids centred on eta_opt = 0.3 C^-0.125, B_opt = 0.29 C^0.327; loss quadratic in logs."""
    rows = []
    for c in (1e15, 1e16, 1e17):
        n = math.sqrt(c / 120)  # 20 tokens per parameter
        eta_opt, b_opt = 0.3 * c**-0.125, 0.29 * c**0.327
        for fe in (1 / 4, 1 / 2, 1, 2, 4):
            for fb in (1 / 2, 1, 2):
                loss = 3.0 * c**-0.05 * (1 + 0.01 * math.log(fe) ** 2 + 0.004 * math.log(fb) ** 2)
                rows.append({"n_params_total": n, "tokens": 20 * n, "lr": eta_opt * fe, "batch_tokens": b_opt * fb, "loss": loss})
    path = tmp_path_factory.mktemp("lr") / "lr.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_lr_scaling_recovers_the_rule_and_writes_a_recipe(lr_table, tmp_path):
    from sweeps.recipe import Recipe, batch_size_for_params, lr_for_params

    fits = fit_path(lr_table, tmp_path, approaches=(), laws=("lr_scaling",), flops="6ND", n_bootstrap=3,
                    extrapolation=False, figures_=False, progress=False)  # fmt: skip
    res = fits["beyond"]["lr_scaling"]
    # the near-optimal band (1%: |ln(lr/eta_opt)| <= ln 2, every batch within it) is symmetric about the optimum
    assert sum(res["near_optimal"]) == 3 * 3 * 3
    assert res["params"]["k_eta"] == pytest.approx(0.3, rel=1e-9) and res["params"]["e_eta"] == pytest.approx(-0.125, abs=1e-9)
    assert res["params"]["k_B"] == pytest.approx(0.29, rel=1e-9) and res["params"]["e_B"] == pytest.approx(0.327, abs=1e-9)
    import yaml

    rule = yaml.safe_load((tmp_path / "lr_rule.yaml").read_text())
    assert rule["eta_opt"]["exponent"] == pytest.approx(-0.125, abs=1e-6)
    recipe = Recipe(**{k: v for k, v in rule["recipe"].items()})
    n = math.sqrt(1e18 / 120)  # a larger model at the same 20 tokens per parameter: C = 120 N^2
    assert lr_for_params(n, recipe) == pytest.approx(0.3 * 1e18**-0.125, rel=1e-5)
    assert batch_size_for_params(n, 1024, recipe) == 2 ** round(math.log2(0.29 * 1e18**0.327 / 1024))  # sequences
    assert not any(b["lr_on_edge"] or b["batch_on_edge"] for b in res["budgets"])
    assert "## Learning rate and batch size" in (tmp_path / "report.md").read_text()
    assert [Path(p).name for p in beyond.draw_all(fits, tmp_path)] == ["lr_scaling.png", "lr_scaling.pdf"]
    # No Chinchilla approach was fitted: no compute-optimal figure of reference lines alone.
    assert sorted(Path(p).stem for p in plot_path(lr_table, tmp_path)) == ["curves", "curves", "lr_scaling", "lr_scaling"]


def test_lr_scaling_names_the_missing_column(tmp_path, capsys):
    path = tmp_path / "t.csv"
    table = {"n_params_total": [1e6, 2e6], "tokens": [2e7, 4e7], "loss": [3.0, 2.9], "batch_tokens": [1e5, 1e5]}
    pd.DataFrame(table).to_csv(path, index=False)
    assert main(["fit", str(path), "--law", "lr_scaling", "--approach", "none", "--flops", "6ND", "--quiet"]) == 2
    assert "needs the column(s) lr " in capsys.readouterr().err
    assert not (tmp_path / "t_fits").exists()



def test_allocate_reads_our_fits_json(tmp_path, capsys):
    (tmp_path / "fits.json").write_text(json.dumps({"approaches": {"3": {"params": references.CHINCHILLA_APPROACH3}}}))
    assert main(["allocate", str(tmp_path), "--budgets", "1e21", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)[0]
    (published,), _ = allocate.allocate("hoffmann2022", budgets=[1e21])
    assert ours["n_params"] == pytest.approx(published["n_params"], rel=1e-9)
    # an over-training fit is allocated as Chinchilla's law with A = a 6^-eta, B = b 6^-eta, alpha = beta = 2 eta
    (tmp_path / "fits.json").write_text(json.dumps({"beyond": {"overtraining": {"params": TRUTH_OT}}}))
    (row,), _ = allocate.allocate(str(tmp_path / "fits.json"), budgets=[1e21])
    assert row["tokens_per_param"] == pytest.approx(overtraining.optimal_multiplier(TRUTH_OT), rel=1e-6)


@pytest.mark.parametrize("name", ["data_constrained", "overtraining", "lr_scaling"])
def test_shipped_specs_fit_their_law(name):
    from sweeps.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    assert spec.fit.options["laws"] == (name,) and spec.fit.options["approaches"] == ()


def test_load_reads_lr_and_batch_tokens_from_the_run_config(tmp_path):
    from analysis import load_runs

    run = tmp_path / "r0"
    run.mkdir()
    (run / "config.yaml").write_text("model: {seq_len: 64}\noptim: {lr: 0.006}\ntrain: {batch_size: 16}\n")
    (run / "result.json").write_text(json.dumps({"status": "done", "n_params_total": 1e4, "tokens": 1e6, "final_eval_loss": 2.0}))
    runs, _ = load_runs(run)
    assert runs.loc[0, "lr"] == 0.006 and runs.loc[0, "batch_tokens"] == 16 * 64


def test_lr_scaling_flags_an_optimum_on_the_grid_edge(lr_table):
    from analysis import lr_scaling

    t = pd.read_csv(lr_table).rename(columns={"n_params_total": "n_params"})
    t["flops"], t["run"] = 6 * t["n_params"] * t["tokens"], [f"r{i}" for i in range(len(t))]
    t = t[t["batch_tokens"] <= 0.29 * t["flops"] ** 0.327 * 1.0001]  # no batch above B_opt: its optimum is unbracketed
    res = lr_scaling.fit_points(t, None, (10, 90))
    assert all(b["batch_on_edge"] and not b["lr_on_edge"] for b in res["budgets"])
    assert any("best batch size lies at the edge" in line for line in lr_scaling.report_lines(res))
