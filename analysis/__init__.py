"""chinchax.analysis: load runs or published tables, fit scaling laws, plot and report.

Never imports ``llm`` or ``sweeps``: it reads run directories (the on-disk contract) or any
table with the same column names, so published data fits exactly like our own.

    runs, curves = analysis.load_runs("sweeps_out/my_sweep")
    fits = analysis.fit_path("sweeps_out/my_sweep", n_bootstrap=1000)
    analysis.plot_path("sweeps_out/my_sweep")
"""

from analysis.api import default_out_dir, fit_path, plot_path
from analysis.approaches import PowerLaw, fit_power_law
from analysis.laws import LAWS, FittedLaw, Law, fit_law
from analysis.load import AnalysisError, AnalysisWarning, load_runs
from analysis.parametric import compute_optimal, fit_parametric
from analysis.pipeline import DEFAULT_LAWS
from analysis.prepare import Points, prepare

__all__ = [
    "AnalysisError", "AnalysisWarning", "DEFAULT_LAWS", "FittedLaw", "LAWS", "Law", "Points", "PowerLaw", "compute_optimal",
    "default_out_dir", "fit_law", "fit_parametric", "fit_path", "fit_power_law", "load_runs", "plot_path", "prepare",
]  # fmt: skip
