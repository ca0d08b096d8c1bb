"""fit_path / plot_path end to end on a synthetic sweep directory and on a published-style table."""

import json
import subprocess
import sys
import warnings

import pandas as pd
import pytest

import analysis
from analysis.load import AnalysisError, AnalysisWarning
from analysis.synthetic import isoflop_sweep, write_sweep

FIGURES = ("curves", "isoflop", "optimal", "isoloss", "kaplan", "residuals")


@pytest.fixture(scope="module")
def fitted_sweep(tmp_path_factory):
    runs, curves = isoflop_sweep(budgets=(1e18, 1e19, 1e20, 1e21), n_sizes=6, noise=0.003, curve_points=10, seed=2)
    runs.loc[2, "status"] = "failed"
    sweep = write_sweep(tmp_path_factory.mktemp("sweep"), runs, curves)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = analysis.fit_path(sweep, n_bootstrap=12, budgets=[1e20, 1e22], progress=False)
    return sweep, fits, runs, caught


def test_fit_path_writes_everything(fitted_sweep):
    sweep, fits, runs, caught = fitted_sweep
    for name in ("fits.json", "compute_optimal.md", "compute_optimal.csv", "report.md"):
        assert (sweep / name).stat().st_size > 100, name
    for fig in FIGURES:
        for ext in ("png", "pdf"):
            assert (sweep / f"{fig}.{ext}").stat().st_size > 5000, (fig, ext)
    on_disk = json.loads((sweep / "fits.json").read_text())
    assert set(on_disk["approaches"]) == {"1", "2", "3"}
    assert on_disk["n_runs"] == len(runs) - 1 and on_disk["flops_convention"] == "6N+attention"
    a3 = on_disk["approaches"]["3"]
    assert a3["n_starts"] == 4500 and a3["converged"] and "start_on_grid_edge" in a3
    assert 1 <= a3["n_starts_at_optimum"] <= a3["n_converged"] + 5
    assert set(a3["intervals"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert len(a3["intervals_at_budgets"]) == 2 and a3["intervals_at_budgets"][0]["N_opt"]["n"] == 12
    assert set(on_disk["laws"]) == {"kaplan_C", "kaplan_ND", "kaplan_NS", "saturating_C"}
    # an IsoFLOP grid has no run that is not limited by data (L(N)) or by size (L(D)): said, not fitted
    assert set(on_disk["laws_unsupported"]) == {"kaplan_N", "kaplan_D"}
    assert "mean_abs_relative_error" in on_disk["extrapolation"]
    # the failed run is named in a warning, in fits.json and in the report
    failed = runs.loc[2, "run"]
    assert any(failed in str(w.message) and issubclass(w.category, AnalysisWarning) for w in caught)
    assert any(failed in w for w in on_disk["warnings"])
    report = (sweep / "report.md").read_text()
    assert failed in report and "Approach 3" in report and "![optimal](optimal.png)" in report
    assert "Laws these runs cannot support" in report and "L(N) is the loss of models not limited by D" in report
    table = pd.read_csv(sweep / "compute_optimal.csv")
    assert len(table) == 2 * 3 and set(table["approach"]) == {1, 2, 3}
    assert (table["N_opt_low"] <= table["N_opt_high"]).all()
    # Approach 3 allocates under the data's convention: here 6N+attention = 1.05 * 6 N D exactly
    fpt = a3["flops_per_token"]
    assert fpt["k"] == pytest.approx(6.3) and fpt["c"] == pytest.approx(1.0) and fpt["max_rel_error"] < 1e-6
    t3 = table[table["approach"] == 3]
    assert (6.3 * t3["N_opt"] * t3["D_opt"] / t3["flops"]).round(6).eq(1).all()


def test_laws_fitted_in_the_helper_process_equal_a_fit_in_one_process(fitted_sweep, tmp_path, monkeypatch):
    from analysis import helper

    sweep = fitted_sweep[0]
    with helper.helper_process() as off:  # conftest sets CHINCHAX_FIT_HELPER=0 for the session
        assert off is None
    monkeypatch.delenv("CHINCHAX_FIT_HELPER")
    started, real_init = [], helper.Helper.__init__

    def counted_init(self, *args, **kwargs):
        started.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(helper.Helper, "__init__", counted_init)

    def fit(parallel):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AnalysisWarning)
            fits = analysis.fit_path(sweep, tmp_path / str(parallel), approaches=(), n_bootstrap=12, extrapolation=False,
                                     figures_=False, progress=False, parallel=parallel)  # fmt: skip
        return fits, [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]

    (serial, serial_warned), (helped, helped_warned) = fit(False), fit(True)
    assert len(started) == (1 if helper.usable_cores() >= 2 else 0)  # the parallel fit ran in a helper, the serial one not
    assert helped["laws"] == serial["laws"] and helped["laws_unsupported"] == serial["laws_unsupported"]
    # the helper's warnings reach the caller, in order, and fits.json
    assert helped_warned == serial_warned and helped["warnings"] == serial["warnings"]
    assert any("kaplan_N not fitted" in w for w in helped_warned)


def test_helper_process_works_from_a_script_without_a_main_guard(tmp_path):
    # multiprocessing's "spawn" would re-run this script in the child and fail; errors keep their type
    script = tmp_path / "fit.py"
    script.write_text(
        "from analysis.helper import Helper\n"
        "h = Helper()\n"
        "print(h.submit(sum, [1, 2, 3]).result())\n"
        "try:\n"
        "    h.submit(int, 'x').result()\n"
        "except ValueError as err:\n"
        "    print('ValueError', any('helper process' in n for n in err.__notes__))\n"
        "h.close()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["6", "ValueError", "True"], done.stderr


def test_plot_path_redraws_figures_only(fitted_sweep):
    sweep, _, _, _ = fitted_sweep
    before = (sweep / "fits.json").stat().st_mtime_ns
    (sweep / "optimal.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        paths = analysis.plot_path(sweep)
    assert (sweep / "optimal.png").is_file() and str(sweep / "optimal.png") in paths
    assert (sweep / "fits.json").stat().st_mtime_ns == before


def test_fit_table_writes_next_to_it(tmp_path):
    runs, _ = isoflop_sweep(budgets=(1e18, 1e19, 1e20), n_sizes=5, noise=0.003, seed=4)
    table = runs[["run", "n_params_total", "tokens", "final_eval_loss"]].rename(columns={"final_eval_loss": "loss"})
    path = tmp_path / "published.csv"
    table.to_csv(path, index=False)
    fits = analysis.fit_path(path, approaches=("2", "3"), laws=("kaplan_N+E",), n_bootstrap=0, extrapolation=False,
                             progress=False)  # fmt: skip
    out = tmp_path / "published_fits"
    assert (out / "fits.json").is_file() and (out / "report.md").is_file() and (out / "isoflop.png").is_file()
    assert fits["flops_convention"] == "6ND" and set(fits["approaches"]) == {"2", "3"}
    assert abs(fits["approaches"]["2"]["a"] - fits["approaches"]["3"]["derived"]["a"]) < 0.06
    with pytest.raises(AnalysisError, match="unknown law"):
        analysis.fit_path(path, approaches=("2",), laws=("kaplan_X",), n_bootstrap=0, progress=False)
    with pytest.raises(AnalysisError, match="at least 6 points"), pytest.warns(AnalysisWarning, match="excluded by request"):
        analysis.fit_path(path, approaches=("3",), laws=(), exclude=table["run"].iloc[3:].tolist(), n_bootstrap=0,
                          progress=False)  # fmt: skip
    with pytest.raises(AnalysisError, match="fits.json not found"):
        analysis.plot_path(path, out_dir=tmp_path / "nowhere")


def test_extrapolation_check_skips_unidentified_fits():
    from types import SimpleNamespace

    from analysis.pipeline import extrapolation_check

    # 2 seeds x 2 sizes x 2 budgets: 6 runs below the threshold but only 2 distinct N there
    points = pd.DataFrame({
        "run": [f"r{i}" for i in range(8)], "n_params": [3e3, 3e3, 1e4, 1e4] * 2,
        "tokens": [4e4, 4e4, 1.6e4, 1.6e4, 1.3e5, 1.3e5, 5.4e4, 5.4e4],
        "flops": [3e9] * 4 + [9.9e9, 9.9e9, 1e10, 1e10], "loss": [2.28, 2.28, 2.47, 2.48, 2.12, 2.12, 2.18, 2.19],
    })  # fmt: skip
    out = extrapolation_check(SimpleNamespace(points=points), holdout_flops=9.95e9)
    assert "distinct N" in out.get("skipped", "")
