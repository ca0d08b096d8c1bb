"""chinchax.sweeps: expand sweep specs into runs, launch them, resume, and own the CLI.

Public face: ``load_spec`` / ``spec_from_dict`` (sweeps.spec), ``expand`` and
``format_plan`` (sweeps.plan), ``run_sweep`` and ``sweep_status`` (sweeps.runner), and
the shape ``Recipe`` (sweeps.recipe). None of these import JAX: runs train in their
own processes.
"""

from sweeps.plan import PlannedRun, expand, format_plan
from sweeps.recipe import Recipe, shape_for_params
from sweeps.runner import SweepReport, run_sweep, sweep_status
from sweeps.spec import SweepSpec, load_spec, spec_from_dict

__all__ = [
    "PlannedRun", "Recipe", "SweepReport", "SweepSpec", "expand", "format_plan", "load_spec",
    "run_sweep", "shape_for_params", "spec_from_dict", "sweep_status",
]
