"""Sweep specs: the YAML that says which runs to make, parsed strictly.

A spec has a ``base`` train config (any key of ``chinchax train``, as a nested
mapping) and axes whose cartesian product gives the runs:

* ``grid``: ``{dotted.config.key: [values]}``; the special key ``n_params`` sizes the
  model by the recipe's shape rule (``sweeps.recipe``).
* ``isoflop``: budgets C and model sizes per budget; each run's step count is solved
  so that its training FLOPs land within ``tolerance`` (1%) of C under ``convention``.
* ``dataset_tokens``: sizes of the unique training pool, for repeated-data runs.

``fit`` asks for ``chinchax fit`` on the sweep directory once the runs are done.
Unknown keys anywhere are errors with a did-you-mean (``llm.typed_yaml.from_dict``).
``eval`` evaluates every finished run on generated tasks (``sweeps.evals``); ``fit.kind`` picks
the analysis run at the end: ``scaling`` (default, ``analysis.fit_path``) or ``emergence``
(``analysis.emergence_report.emergence_path``: figures and table into ``<sweep dir>/emergence/``;
it needs an ``eval`` section). ``fit.options`` are that function's keyword arguments.
Expansion into runs lives in ``sweeps.plan``. Example::

    name: my_sweep                 # default: the file name; sweep dir sweeps_out/<name>
    convention: 6N+attention       # FLOP convention of budgets and of the plan's C
    base:                          # any train config, as in `chinchax train`
      model: {seq_len: 256}
      train: {batch_size: 32}
    recipe: {aspect_ratio: 32, head_dim: 32, round_to: 32}   # sweeps.recipe.Recipe
    isoflop:
      budgets: [1e15, 1e16]
      n_params: [1e6, 3e6, 1e7]    # or {1e15: [...], 1e16: [...]}, or n_sizes: 5
    grid: {train.seed: [0, 1]}     # crossed with everything else
    dataset_tokens: [1e7]          # unique-token pool per run (repeated data)
    max_epochs: 4                  # most passes over the unique training data (more is a plan error)
    wsd_branches: true             # with optim.schedule=wsd: runs that differ only in length branch their
                                   # cooldowns off the longest one (sweeps.plan.plan_branches)
    fit: {options: {flops: 6N+attention}}   # keyword arguments of analysis.fit_path
    eval:                          # evaluate every finished run on generated tasks (sweeps.evals)
      tasks: [facts, add3_reversed, recall]
      shots: 4
      items: 500                   # test items per task
      seed: 0                      # draws the items and the demonstrations
      steps: [500, 1000]           # optional: checkpoints evaluated too (training must keep them)
      params: {recall: {n_pairs: 10}}   # optional: task parameters (over those of base.data.tasks)
    # fit: {kind: emergence}       # instead of the scaling-law fit: analysis.emergence_path
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from llm.config import Config, config_from_dict
from llm.typed_yaml import ConfigError, apply_overrides, flatten, from_dict, read_yaml
from rundir import FLOP_CONVENTIONS, did_you_mean
from sweeps.recipe import Recipe

SIZE_KEY = "n_params"


@dataclasses.dataclass(frozen=True)
class IsoFlopSpec:
    """IsoFLOP profiles (Chinchilla Approach 2): several model sizes at each budget C."""

    budgets: tuple[float, ...] = ()  # C in FLOPs under the spec's convention
    n_params: Any = None  # [N, ...] for every budget, or {C: [N, ...]} per budget
    n_sizes: int | None = None  # instead of n_params: this many sizes around N_opt(C)
    spread: float = 4.0  # auto sizes run log-evenly from N_opt/spread to N_opt*spread
    tokens_per_param: float = 20.0  # auto sizes: N_opt = sqrt(C / (6 * tokens_per_param))
    tolerance: float = 0.01  # each run's C within this fraction of its budget


FIT_KINDS = ("scaling", "emergence")


@dataclasses.dataclass(frozen=True)
class FitSpec:
    """Run ``analysis.fit_path`` (kind scaling) or ``emergence_path`` (kind emergence) on the sweep directory."""

    enabled: bool = True
    kind: str = "scaling"  # scaling | emergence
    options: Any = None  # extra keyword arguments for that function


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluate every finished run few-shot on generated tasks (``llm.evaluation.evaluate_tasks``)."""

    tasks: tuple[str, ...] = ()  # llm.tasks names; a task mixed into training uses its data.tasks params
    shots: int = 0  # demonstrations before each query
    items: int = 500  # test items per task (fewer when the task's test split is smaller)
    seed: int = 0  # draws the items and the demonstrations
    steps: tuple[int, ...] = ()  # checkpoints evaluated besides the final step (ability against step)
    batch_size: int = 64  # sequences per evaluation batch
    params: dict[str, dict[str, Any]] | None = None  # per task: get_task parameters over its trained ones, e.g. {recall: {n_pairs: 10}}


@dataclasses.dataclass(frozen=True)
class EstimateSpec:
    """Throughput assumed by ``sweep plan`` for its time column."""

    flops_per_s: float = 0.4 * 989e12  # sustained training FLOP/s (40% MFU of an H100 in bf16)
    overhead_s: float = 30.0  # per run: start-up, compilation, data, evaluations, checkpoints


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec; see the module docstring."""

    name: str | None = None  # default: the spec file's stem
    description: str | None = None
    convention: str = "6N+attention"  # FLOP convention of budgets and of the plan's C column
    base: Any = None  # nested train-config mapping
    recipe: Recipe = Recipe()
    grid: Any = None  # {dotted key: [values]}
    isoflop: IsoFlopSpec | None = None
    dataset_tokens: tuple[int, ...] | None = None
    fit: FitSpec | None = None
    eval: EvalSpec | None = None
    estimate: EstimateSpec = EstimateSpec()
    max_epochs: float = 4.0  # most passes over the unique training data a run may plan (sweeps.plan.check_epochs)
    wsd_branches: bool = True  # wsd runs differing only in length: one main run + cooldown branches (sweeps.plan.plan_branches)



def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the run config (``model.d_model``, ``model.moe.top_k``, ...)."""
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        inner = [t for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)]
        tp = inner[0] if inner else hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.append(name)  # a whole section (e.g. model.moe: null) is a value too
            keys.extend(config_keys(tp, f"{name}."))
        else:
            keys.append(name)
    return keys


def _check_grid(grid: Any) -> dict[str, tuple[Any, ...]]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"grid: expected a mapping of config keys to lists of values, got {grid!r}")
    allowed = config_keys() + [SIZE_KEY]
    out = {}
    # {"optim": {"lr": [..]}} and {"optim.lr": [..]} both mean the key optim.lr.
    for key, values in flatten(grid).items():
        if key not in allowed:
            raise ConfigError(
                f"grid: unknown config key '{key}'{did_you_mean(key, allowed)}; grid keys are dotted "
                f"config keys such as model.d_model or optim.lr, or '{SIZE_KEY}' (model size by the recipe)"
            )
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"grid.{key}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"grid.{key} is empty: a grid axis needs at least one value")
        if key == SIZE_KEY and not all(_positive_number(n) for n in values):
            raise ConfigError(f"grid.{SIZE_KEY}: sizes must be finite numbers > 0, got {list(values)!r}")
        out[key] = tuple(values)
    return out


def _positive_number(value: Any) -> bool:
    """A finite number > 0 (bools are not numbers here; NaN fails every comparison)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def _check_source(source: Any, where: str) -> None:
    """Refuse a data source that cannot load (missing files, unknown corpus) before hours of other runs."""
    if not isinstance(source, str):
        return  # config_from_dict names the type error when the run resolves
    scheme, _, name = source.partition(":")
    if scheme == "text":
        from llm.data.text_files import text_files

        try:
            text_files(name)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        return
    if scheme == "builtin":
        from llm.data.builtin import BUILTIN as names
    elif scheme == "synthetic":
        from llm.data.synthetic import SYNTHETIC as names
    else:
        return  # tfds names are only known to the (optional, online) catalogue
    if name not in names:
        choices = [f"{scheme}:{n}" for n in names]
        raise ConfigError(
            f"{where}: data.source: unknown {'builtin corpus' if scheme == 'builtin' else 'synthetic source'} {source!r}"
            f"{did_you_mean(source, choices)}; choose one of {', '.join(choices)}"
        )


def _check_isoflop(iso: IsoFlopSpec, grid: Mapping[str, Any]) -> None:
    if not iso.budgets:
        raise ConfigError("isoflop.budgets is empty: give at least one compute budget C in FLOPs")
    if any(not c > 0 for c in iso.budgets):
        raise ConfigError(f"isoflop.budgets must be > 0, got {list(iso.budgets)}")
    if (iso.n_params is None) == (iso.n_sizes is None):
        raise ConfigError("isoflop: set exactly one of n_params (explicit sizes) and n_sizes (sizes around N_opt)")
    if iso.n_sizes is not None and iso.n_sizes < 1:
        raise ConfigError(f"isoflop.n_sizes must be >= 1, got {iso.n_sizes}")
    if iso.spread < 1 or iso.tokens_per_param <= 0 or not 0 < iso.tolerance < 1:
        raise ConfigError("isoflop: need spread >= 1, tokens_per_param > 0 and 0 < tolerance < 1")
    clash = [k for k in (SIZE_KEY, "train.steps", "train.tokens") if k in grid]
    if clash:
        raise ConfigError(f"grid sets {', '.join(clash)}, which isoflop solves for; drop them from the grid")


def isoflop_sizes(iso: IsoFlopSpec, budget: float) -> tuple[float, ...]:
    """Target model sizes N for one budget C (explicit, or log-spaced around N_opt(C))."""
    if iso.n_sizes is not None:
        n_opt = (budget / (6.0 * iso.tokens_per_param)) ** 0.5
        if iso.n_sizes == 1:
            return (n_opt,)
        lo, hi = n_opt / iso.spread, n_opt * iso.spread
        return tuple(lo * (hi / lo) ** (i / (iso.n_sizes - 1)) for i in range(iso.n_sizes))
    sizes = iso.n_params
    if isinstance(sizes, Mapping):
        by_budget = {float(c): v for c, v in sizes.items()}
        if float(budget) not in by_budget:
            raise ConfigError(f"isoflop.n_params has no sizes for budget {budget:g}")
        sizes = by_budget[float(budget)]
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise ConfigError(f"isoflop.n_params for budget {budget:g}: expected a non-empty list, got {sizes!r}")
    if not all(_positive_number(n) for n in sizes):
        raise ConfigError(f"isoflop.n_params for budget {budget:g}: sizes must be positive numbers, got {sizes!r}")
    return tuple(float(n) for n in sizes)


def spec_from_dict(data: Mapping[str, Any] | None, name: str | None = None) -> SweepSpec:
    """Parse and check a spec mapping; raises ConfigError before anything is launched."""
    data = dict(data or {})
    if isinstance(data.get("fit"), bool):  # `fit: true` is the short form
        data["fit"] = {} if data["fit"] else None
    if isinstance(data.get("dataset_tokens"), (int, float)) and not isinstance(data.get("dataset_tokens"), bool):
        data["dataset_tokens"] = [data["dataset_tokens"]]
    spec = from_dict(SweepSpec, data)
    if spec.name is None and name is not None:
        spec = dataclasses.replace(spec, name=name)
    if not spec.name or spec.name.startswith(".") or any(c in "/\\" or not c.isprintable() for c in spec.name):
        raise ConfigError(
            f"name: a sweep needs a plain folder name (no '/', '\\', control characters or leading '.'), got {spec.name!r}"
        )
    if spec.convention not in FLOP_CONVENTIONS:
        raise ConfigError(
            f"convention={spec.convention!r} is not allowed{did_you_mean(spec.convention, FLOP_CONVENTIONS)}; "
            f"choose one of {', '.join(FLOP_CONVENTIONS)}"
        )
    if spec.base is not None and not isinstance(spec.base, Mapping):
        raise ConfigError("base: expected a mapping of train config sections (model, data, optim, train)")
    try:
        base = config_from_dict(spec.base or {})
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    grid = _check_grid(spec.grid)
    if spec.grid is not None and not grid and spec.isoflop is None and spec.dataset_tokens is None:
        # README: empty grids are errors; beside isoflop or dataset_tokens `grid: {}` adds nothing and is harmless.
        raise ConfigError("grid is empty: give at least one axis (e.g. grid: {train.seed: [0, 1]}) or drop the key")
    _check_source(base.data.source, "base")
    for source in grid.get("data.source", ()):
        _check_source(source, "grid")
    if spec.isoflop is not None:
        _check_isoflop(spec.isoflop, grid)
        for budget in spec.isoflop.budgets:
            isoflop_sizes(spec.isoflop, budget)
    if spec.dataset_tokens is not None:
        if not spec.dataset_tokens:
            raise ConfigError("dataset_tokens is empty: give at least one pool size in tokens")
        if any(d <= 0 for d in spec.dataset_tokens):
            raise ConfigError(f"dataset_tokens must be > 0, got {list(spec.dataset_tokens)}")
        if "data.dataset_tokens" in grid:
            raise ConfigError("set dataset sizes either in dataset_tokens or in grid.data.dataset_tokens, not both")
    if spec.eval is not None:
        _check_eval(spec.eval)
    if spec.fit is not None:
        if spec.fit.kind not in FIT_KINDS:
            raise ConfigError(f"fit.kind={spec.fit.kind!r} is not allowed{did_you_mean(str(spec.fit.kind), FIT_KINDS)}; "
                              f"choose one of {', '.join(FIT_KINDS)}")  # fmt: skip
        if spec.fit.kind == "emergence" and spec.fit.enabled and spec.eval is None:
            raise ConfigError("fit.kind=emergence scores the runs' evaluations: add an eval section "
                              "(e.g. eval: {tasks: [add3_reversed], shots: 4})")  # fmt: skip
    if spec.fit is not None and spec.fit.options is not None:
        if not isinstance(spec.fit.options, Mapping):
            raise ConfigError(f"fit.options: expected a mapping of keyword arguments, got {spec.fit.options!r}")
        check = _check_emergence_options if spec.fit.kind == "emergence" else _check_fit_options
        spec = dataclasses.replace(spec, fit=dataclasses.replace(spec.fit, options=check(spec.fit.options)))
    if not spec.max_epochs > 0:  # NaN fails too
        raise ConfigError(f"max_epochs must be > 0, got {spec.max_epochs}")
    if spec.estimate.flops_per_s <= 0 or spec.estimate.overhead_s < 0:
        raise ConfigError("estimate: need flops_per_s > 0 and overhead_s >= 0")
    return spec


def _check_eval(ev: EvalSpec) -> None:
    """Task names, counts and steps of the eval section, checked before any training."""
    from llm.tasks import TASKS, check_task_params

    if not ev.tasks:
        raise ConfigError("eval.tasks is empty: name at least one task (e.g. eval.tasks=[add3_reversed])")
    for name in ev.tasks:
        if name not in TASKS:
            raise ConfigError(f"eval.tasks: unknown task {name!r}{did_you_mean(str(name), list(TASKS))}; "
                              f"choose from {', '.join(TASKS)}")  # fmt: skip
    if len(set(ev.tasks)) != len(ev.tasks):
        raise ConfigError(f"eval.tasks lists a task twice: {list(ev.tasks)}")
    for key, low in (("shots", 0), ("items", 1), ("seed", 0), ("batch_size", 1)):
        value = getattr(ev, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"eval.{key} must be an integer >= {low}, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in ev.steps):
        raise ConfigError(f"eval.steps: expected training steps (integers >= 1), got {list(ev.steps)}")
    check_task_params(ev.params, ev.tasks, "eval.params")


def _check_emergence_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """fit.options of kind emergence: keyword arguments of analysis.emergence_report.emergence_path."""
    import inspect

    from analysis.emergence_report import emergence_path

    allowed = [n for n in inspect.signature(emergence_path).parameters if n != "path"]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown config key 'fit.options.{key}'{did_you_mean(str(key), allowed)}; fit options of kind "
                f"emergence are keyword arguments of analysis.emergence_report.emergence_path: {', '.join(allowed)}"
            )
    out = dict(options)
    for key in ("n_bootstrap", "seed"):
        if key in out:
            out[key] = _fit_count(out[key], f"fit.options.{key}")
    for key in ("include_stale", "figures_"):
        if key in out:
            out[key] = _fit_bool(out[key], f"fit.options.{key}")
    if "out_dir" in out:
        out["out_dir"] = _fit_out_dir(out["out_dir"], "fit.options.out_dir")
    if "flops" in out:
        out["flops"] = _fit_choice(("auto", "6N", *FLOP_CONVENTIONS))(out["flops"], "fit.options.flops")
    if "n_params" in out:
        out["n_params"] = _fit_choice(lambda: _run_columns(prefix="n_params"))(out["n_params"], "fit.options.n_params")
    return out


def _check_fit_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Names and values must be what analysis.fit_path takes: a bad option must not surface after hours of training.

    Returns the options normalised for the call (tuples, ints for integer counts, floats for FLOPs).
    """
    if not options:
        return {}
    import inspect

    from analysis import fit_path

    allowed = [n for n in inspect.signature(fit_path).parameters if n != "path"]  # path is the sweep dir
    out = {}
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown config key 'fit.options.{key}'{did_you_mean(str(key), allowed)}; "
                f"fit options are keyword arguments of analysis.fit_path: {', '.join(allowed)}"
            )
        check = _FIT_OPTION_CHECKS.get(key)
        out[key] = check(value, f"fit.options.{key}") if check else value  # a newer keyword: fit_path checks it
    return out


def _fit_choice(choices: Any) -> Any:
    def check(value: Any, where: str) -> str:
        allowed = list(choices()) if callable(choices) else list(choices)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not allowed{did_you_mean(str(value), allowed)}; choose one of {', '.join(allowed)}")
        return value

    return check


def _fit_count(value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML reads 1e3 as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be an integer >= 0, got {value!r}")
    return value


def _fit_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _fit_flops(value: Any, where: str) -> float | None:
    if value is not None and not _positive_number(value):
        raise ConfigError(f"{where} must be a finite number > 0 (FLOPs) or null, got {value!r}")
    return None if value is None else float(value)


def _fit_budgets(value: Any, where: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(_positive_number(c) for c in value):
        raise ConfigError(f"{where}: expected a non-empty list of finite numbers > 0 (FLOPs) or null, got {value!r}")
    return tuple(float(c) for c in value)


def _fit_approaches(value: Any, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or str(item) not in ("1", "2", "3"):
            raise ConfigError(f"{where}: {str(item)!r} is not allowed; choose from 1, 2, 3")
    return tuple(str(a) for a in items)


def _fit_laws(value: Any, where: str) -> tuple[str, ...]:
    from analysis import AnalysisError
    from analysis.laws import law_from_name

    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of law names, got {value!r}")
    from analysis.beyond import NAMES as beyond_laws

    for name in value:
        if str(name) in beyond_laws:
            continue
        try:
            law_from_name(str(name))
        except AnalysisError as err:
            raise ConfigError(f"{where}: {err}") from None
    return tuple(str(n) for n in value)


def _fit_percentiles(value: Any, where: str) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        not isinstance(p, bool) and isinstance(p, (int, float)) for p in value
    )
    if not ok or not 0 <= value[0] < value[1] <= 100:
        raise ConfigError(f"{where}: expected [low, high] with 0 <= low < high <= 100, got {value!r}")
    return float(value[0]), float(value[1])


def _fit_exclude(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise ConfigError(f"{where}: expected a list of run names, got {value!r}")
    return tuple(value)


def _fit_out_dir(value: Any, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: expected a folder path, got {value!r}")
    return value


def _run_columns(suffix: str = "", prefix: str = "") -> list[str]:
    from analysis.load import RUN_COLUMNS

    return [c for c in RUN_COLUMNS if c.startswith(prefix) and c.endswith(suffix)]


# Values analysis.fit_path accepts, keyword by keyword (its docstring and fit_points).
_FIT_OPTION_CHECKS = {
    "out_dir": _fit_out_dir,
    "approaches": _fit_approaches,
    "laws": _fit_laws,
    "budgets": _fit_budgets,
    "isoflop_budgets": _fit_budgets,
    "interpolate": _fit_choice(("auto", "always", "never")),
    "approach2": _fit_choice(("local", "akima", "parabola")),
    "flops": _fit_choice(("auto", "6ND", *FLOP_CONVENTIONS)),
    "n_params": _fit_choice(lambda: _run_columns(prefix="n_params")),
    "loss": _fit_choice(lambda: _run_columns(suffix="_loss")),
    "exclude": _fit_exclude,
    "n_bootstrap": _fit_count,
    "seed": _fit_count,
    "percentiles": _fit_percentiles,
    "holdout_flops": _fit_flops,
    "extrapolation": _fit_bool,
    "figures_": _fit_bool,
    "progress": _fit_bool,
    "include_stale": _fit_bool,
    "parallel": _fit_bool,
}


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(data: Any) -> Any:
    """YAML 1.1 reads ``1e12`` (no dot) as a string; in a spec it always means a number."""
    if isinstance(data, Mapping):
        return {k: _numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_numbers(v) for v in data]
    if isinstance(data, str) and _FLOAT_RE.match(data.strip()):
        return float(data)
    return data


def read_spec(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepSpec, dict[str, Any]]:
    """Parsed spec and the raw mapping it came from (file, then ``key=value`` overrides)."""
    path = Path(path)
    data = _numbers(apply_overrides(read_yaml(path), overrides))
    return spec_from_dict(data, name=path.stem), data


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a spec file, apply ``key=value`` overrides (e.g. ``isoflop.budgets=[1e12]``), parse it."""
    return read_spec(path, overrides)[0]


def grid_axes(spec: SweepSpec) -> dict[str, tuple[Any, ...]]:
    """The checked, flattened grid of a parsed spec."""
    return _check_grid(spec.grid)
