"""Expand a sweep spec into fully resolved runs, with deterministic names and the plan table.

Each run's config is built in this order, later steps winning:
base -> recipe (shape from the target N, then learning rate, batch size and warmup, each
only where neither base nor the run's axes set that key) -> the run's axis values ->
isoflop step count. Sweeps always switch the per-run progress bar off (the sweep
draws its own), which does not change the run's identity.

A run's name is a readable prefix of what varies (budget, N, D, other axes) and a
short hash of everything in its resolved config that can change its numbers (measured
against a frozen record of the defaults, so a default changed in code is a new run), so the
same spec always maps to the same run directories and a changed config never reuses an old
run's directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from typing import Any, Mapping

from llm.config import EXECUTION_KEYS, Config, ConfigError, ModelConfig, config_from_dict, total_steps, tokens_per_step
from llm.typed_yaml import deep_copy, from_dict
from rundir import format_duration
from sweeps.recipe import batch_size_for_params, count_params, lr_for_params, model_for_params
from sweeps.spec import SIZE_KEY, SweepSpec, grid_axes, isoflop_sizes

_MODEL_SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.d_ff")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its name, resolved config and the numbers of the plan table."""

    name: str
    config: Config
    axes: dict[str, Any]  # the axis values that made this run (dotted keys, n_params, budget)
    n_params: int  # N as the recipe counts it (recipe.count)
    tokens: int  # D: training tokens
    flops: float  # C under the spec's convention
    steps: int
    budget: float | None  # isoflop C target, if any
    est_time_s: float
    epochs: float | None = None  # D over the unique training tokens; None when unknown at plan time
    parent: str | None = None  # a wsd cooldown branch: the run it starts from ...
    branch_step: int | None = None  # ... after this many of the parent's steps
    branch_steps: tuple[int, ...] = ()  # a parent: steps at which it keeps a checkpoint for its branches

    @property
    def trained_flops(self) -> float:
        """C this run computes itself: a branch only its cooldown (its ``flops`` count the shared prefix too)."""
        return self.flops if self.branch_step is None else self.flops * (self.steps - self.branch_step) / self.steps


# Unique training tokens of the builtin corpora with data.tokenizer=bytes and the default
# data.eval_fraction=0.01, as llm.data tokenises them (documents + one end-of-text id each),
# counted once from the token cache so that planning stays instant and offline;
# tests/test_sweep_epochs.py recounts kjv and checks the others against a cache when present.
BUILTIN_TRAIN_TOKENS = {"builtin:kjv": 4_191_688, "builtin:gcide": 28_464_612, "builtin:english": 32_656_300}


def unique_train_tokens(cfg: Config) -> int | None:
    """Unique training tokens a run draws from, known without tokenising; None when unknown.

    data.dataset_tokens when set; else the recorded size of a builtin corpus (bytes, default
    held-out fraction); else the size in a token cache manifest of an earlier run on the same
    source, tokenizer, vocabulary and held-out fraction.
    """
    data = cfg.data
    if data.dataset_tokens is not None:
        return int(data.dataset_tokens)
    if data.tokenizer == "bytes" and data.eval_fraction == 0.01 and data.source in BUILTIN_TRAIN_TOKENS:
        return BUILTIN_TRAIN_TOKENS[data.source]
    if data.source.startswith("synthetic:"):
        return None  # generated, not a pool read from files
    return _cached_train_tokens(data.cache_dir, data.source, data.tokenizer, cfg.model.vocab_size, data.eval_fraction)


def _cached_train_tokens(cache_dir, source: str, tokenizer: str, vocab_size: int, eval_fraction: float) -> int | None:
    """Training tokens recorded by the newest matching manifest of llm.data's token cache."""
    from llm.data.store import default_cache_dir

    best: tuple[float, int] | None = None
    for path in (default_cache_dir(cache_dir) / "datasets").glob("*.json"):
        try:
            m = json.loads(path.read_text())
            match = (m["source"], m["tokenizer"]["name"], m["vocab_size"], m["eval_fraction"]) == (
                source, tokenizer, vocab_size, eval_fraction)  # fmt: skip
            if match and (best is None or path.stat().st_mtime > best[0]):
                best = (path.stat().st_mtime, int(m["tokens"]["train"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another file of the cache (document lists), or one being written
    return None if best is None else best[1]


def _short(x: float) -> str:
    """Compact number for names: 24576 -> '2.5e4', 0.003 -> '3e-3', 64 -> '64'."""
    if isinstance(x, int) and abs(x) < 10000:
        return str(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 10000:
        return str(int(x))
    mant, exp = f"{x:.2g}".split("e") if "e" in f"{x:.2g}" else (f"{x:.2g}", "0")
    exp_i = int(exp)
    return mant if exp_i == 0 else f"{mant}e{exp_i}"


def _slug(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (int, float)):
        return _short(value)
    if isinstance(value, Mapping):  # e.g. a model.moe section: its first two values, "8x2"
        return "x".join(_slug(v) for v in list(value.values())[:2])
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_")


def config_changes(cfg: Any, default: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys where ``cfg`` differs from ``default`` (a section switched on counts as "on")."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        base = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            if base is None:  # an optional section (model.moe) switched on: diff it from its own defaults
                out[key] = "on"
                base = type(value)()
            out.update(config_changes(value, base, f"{key}."))
        elif value != base:
            out[key] = value
    return out


# Run identity is measured against this FROZEN record of the config defaults as they were
# when run names were introduced, never against the live defaults: a default changed in code
# then shows up as a difference, so a "done" run trained under the old value is not reused,
# while names made under these values stay the same. Every field that exists must be listed:
# a new field goes in with the value that reproduces runs trained before it existed (its
# "off" value, not necessarily its new default); a field missing here always counts, so
# names stay correct, only less stable (tests/test_sweep_identity.py checks the coverage).
# An optional section (model.moe) is None when off and "on" when set, then its own keys count.
IDENTITY_BASELINE: dict[str, Any] = {
    "model.d_model": 128, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": None,
    "model.d_ff": 512, "model.vocab_size": 256, "model.seq_len": 128, "model.mlp": "swiglu",
    "model.tie_embeddings": False, "model.rope_theta": 10000.0, "model.norm_eps": 1e-6,
    "model.init_std": 0.02, "model.compute_dtype": "bfloat16", "model.param_dtype": "float32",
    "model.remat": False, "model.moe": None,
    "model.moe.n_experts": 8, "model.moe.top_k": 2, "model.moe.every": 1, "model.moe.d_ff_expert": None,
    "model.moe.n_shared": 0, "model.moe.capacity_factor": None, "model.moe.ep_capacity_factor": None, "model.moe.grouped_matmul": "ragged_dot",
    "model.moe.load_balance_coef": 0.01, "model.moe.router_z_coef": 0.001,
    "data.source": "builtin:english", "data.tokenizer": "bytes", "data.seed": 0, "data.dataset_tokens": None,
    "data.eval_fraction": 0.01, "data.cache_dir": None, "data.tfds_data_dir": None,
    "data.tfds_manual_dir": None, "data.tfds_split": "train", "data.text_key": "text",
    "data.markov_alpha": 0.3, "data.markov_support": 16,
    "data.tasks": None, "data.tasks.names": (), "data.tasks.params": None, "data.tasks.fraction": 0.1,
    "data.tasks.seed": 0, "data.tasks.pool_tokens": 1_000_000,
    "optim.lr": 3e-3, "optim.schedule": "cosine", "optim.warmup_steps": 50, "optim.min_lr_ratio": 0.1,
    "optim.decay_fraction": 0.2, "optim.decay_shape": "linear", "optim.weight_decay": 0.1, "optim.b1": 0.9, "optim.b2": 0.95,
    "optim.eps": 1e-8, "optim.grad_clip": 1.0, "optim.z_loss_coef": 0.0,
    "train.batch_size": 16, "train.grad_accum": 1, "train.steps": None, "train.tokens": 2_000_000,
    "train.seed": 0, "train.eval_every": 100, "train.eval_tokens": 32768, "train.log_every": 10,
    "train.checkpoint_every": 200, "train.keep_checkpoints": 2, "train.tensorboard": True,
}  # fmt: skip
# Keys that say how a run is executed, never what it computes (llm.config.EXECUTION_KEYS:
# the progress bar, the MoE kernel); when in doubt a key counts.
COSMETIC_KEYS = frozenset(EXECUTION_KEYS)


def flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf values of a config; an optional section is None when off, "on" plus its keys when set."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if f.default is None:  # optional section switched on
                out[key] = "on"
            out.update(flat_config(value, f"{key}."))
        else:
            out[key] = value
    return out


def identity_changes(cfg: Config) -> dict[str, Any]:
    """What a resolved config changes from IDENTITY_BASELINE (cosmetic keys left out)."""
    return {
        key: value
        for key, value in flat_config(cfg).items()
        if key not in COSMETIC_KEYS and (key not in IDENTITY_BASELINE or IDENTITY_BASELINE[key] != value)
    }


def config_hash(cfg: Config) -> str:
    """Short hash of everything in a resolved config that can change a run's numbers.

    It hashes the differences from IDENTITY_BASELINE (frozen), so a changed default in
    code gives new run names while names made under the recorded defaults stay valid.
    """
    blob = json.dumps(identity_changes(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_name(cfg: Config, axes: Mapping[str, Any], n: int, tokens: int) -> str:
    """Readable, deterministic run name: varying axes, N and D, then the config hash."""
    parts = []
    if "budget" in axes:
        parts.append(f"C{_short(float(axes['budget']))}")
    parts += [f"N{_short(n)}", f"D{_short(tokens)}"]
    for key, value in axes.items():
        if key in ("budget", SIZE_KEY, "train.tokens", "train.steps"):
            continue
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{leaf}{_slug(value)}")
    prefix = "-".join(parts)[:80]
    return f"{prefix}-{config_hash(cfg)}"


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node = data
    for part in path:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"'{dotted}': '{part}' is a value, not a section")
            node[part] = child
        node = child
    node[leaf] = value


def _has(data: Mapping[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Cartesian product of the spec's axes, each point a dict of axis values."""
    grid = grid_axes(spec)
    axes: list[list[dict[str, Any]]] = []
    if spec.isoflop is not None:
        axes.append(
            [{"budget": c, SIZE_KEY: n} for c in spec.isoflop.budgets for n in isoflop_sizes(spec.isoflop, c)]
        )
    for key, values in grid.items():
        axes.append([{key: v} for v in values])
    if spec.dataset_tokens is not None:
        axes.append([{"data.dataset_tokens": d} for d in spec.dataset_tokens])
    points = []
    for combo in itertools.product(*axes):
        point: dict[str, Any] = {}
        for part in combo:
            point.update(part)
        points.append(point)
    return points


def _describe(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "base"


def resolve(spec: SweepSpec, point: Mapping[str, Any]) -> tuple[Config, int | None]:
    """The resolved config of one point (and, for isoflop points, the run's step count)."""
    base = deep_copy(spec.base or {})
    data = deep_copy(base)
    recipe = spec.recipe
    explicit = {k: v for k, v in point.items() if k not in ("budget", SIZE_KEY)}
    for key, value in explicit.items():
        _set(data, key, deep_copy(value))
    # train.tokens from an axis switches train.steps off, and vice versa.
    if "train.tokens" in explicit and "train.steps" not in explicit:
        _set(data, "train.steps", None)
    if "train.steps" in explicit and "train.tokens" not in explicit:
        _set(data, "train.tokens", None)

    def is_set(key: str) -> bool:
        return key in explicit or _has(base, key)

    sized = SIZE_KEY in point
    if sized:
        clash = [k for k in _MODEL_SHAPE_KEYS if k in explicit]
        if clash:
            raise ConfigError(f"grid sets both {SIZE_KEY} and {', '.join(clash)}; the recipe chooses the shape")
        model = from_dict(ModelConfig, data.get("model") or {}, "model")
        model = model_for_params(float(point[SIZE_KEY]), model, recipe)
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "n_kv_heads"):
            _set(data, f"model.{key}", getattr(model, key))
        n = count_params(model, recipe)
        if not is_set("optim.lr"):
            _set(data, "optim.lr", lr_for_params(n, recipe))
        if not is_set("train.batch_size"):
            batch = batch_size_for_params(n, model.seq_len, recipe)
            if batch is not None:
                _set(data, "train.batch_size", batch)
    _set(data, "train.progress", False)

    steps = None
    if "budget" in point:
        from llm.counting import flops_per_token

        cfg = config_from_dict({**data, "train": {**data.get("train", {}), "steps": 1, "tokens": None}})
        per_token = flops_per_token(cfg.model, spec.convention)
        budget = float(point["budget"])
        steps = int(round(budget / (per_token * tokens_per_step(cfg))))
        if steps < 1:
            raise ConfigError(
                f"isoflop budget {budget:.3g} is too small for N={point[SIZE_KEY]:.3g}: one step of "
                f"{tokens_per_step(cfg)} tokens already costs {per_token * tokens_per_step(cfg):.3g} FLOPs"
            )
        _set(data, "train.steps", steps)
        _set(data, "train.tokens", None)
    if sized and recipe.warmup_fraction is not None and not is_set("optim.warmup_steps"):
        probe = config_from_dict(data)
        _set(data, "optim.warmup_steps", int(round(recipe.warmup_fraction * total_steps(probe))))
    return config_from_dict(data), steps


def expand(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the spec, in axis order; ConfigError on any invalid or duplicate run."""
    from llm.counting import flops_per_token

    runs: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for point in _points(spec):
        try:
            cfg, _ = resolve(spec, point)
        except ConfigError as err:
            raise ConfigError(f"run {_describe(point)}: {err}") from None
        steps = total_steps(cfg)
        tokens = steps * tokens_per_step(cfg)
        per_token = flops_per_token(cfg.model, spec.convention)
        flops = per_token * tokens
        budget = float(point["budget"]) if "budget" in point else None
        if budget is not None and abs(flops / budget - 1) > spec.isoflop.tolerance:
            raise ConfigError(
                f"run {_describe(point)}: budget {budget:.3g} is too small for this model: {steps} step(s) "
                f"give C={flops:.3g}, off by {100 * abs(flops / budget - 1):.1f}% (tolerance "
                f"{100 * spec.isoflop.tolerance:g}%); raise the budget or use smaller sizes"
            )
        n = count_params(cfg.model, spec.recipe)
        name = run_name(cfg, point, n, tokens)
        digest = config_hash(cfg)
        if digest in seen:
            raise ConfigError(
                f"duplicate runs: {_describe(point)} resolves to the same config as {seen[digest]} "
                "(e.g. two target sizes rounding to one shape); remove one"
            )
        seen[digest] = _describe(point)
        est = flops_per_token(cfg.model, "6N+attention") * tokens / spec.estimate.flops_per_s + spec.estimate.overhead_s
        unique = unique_train_tokens(cfg)
        epochs = None if not unique else tokens / unique
        check_epochs(spec, name, cfg, tokens, unique)
        runs.append(PlannedRun(name, cfg, dict(point), n, tokens, flops, steps, budget, est, epochs))
    if not runs:
        raise ConfigError("the spec expands to no runs")
    return plan_branches(runs, spec.estimate.overhead_s) if spec.wsd_branches else runs


def plan_branches(runs: list[PlannedRun], overhead_s: float = 0.0) -> list[PlannedRun]:
    """Turn families of wsd runs that differ only in length into one main run plus cooldown branches.

    The longest run of a family trains in full and keeps a checkpoint at the step where each
    shorter run's cooldown begins (``llm.schedule.decay_start``); each shorter run starts from
    that checkpoint and trains only its cooldown (Hägele et al. 2024). A run whose prefix would
    differ from the main run's (another warmup: warmup is capped at half a run) stays independent.
    """
    from llm.schedule import branch_mismatch, decay_start

    families: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        if run.config.optim.schedule == "wsd":
            rest = {k: v for k, v in identity_changes(run.config).items() if k not in ("train.steps", "train.tokens")}
            families.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(i)
    out = list(runs)
    for members in families.values():
        main = runs[max(members, key=lambda i: runs[i].steps)]
        steps = set()
        for i in members:
            run = runs[i]
            step = decay_start(run.config.optim, run.steps)
            if run is main or branch_mismatch(main.config, run.config, step) is not None:
                continue
            share = (run.steps - step) / run.steps
            out[i] = dataclasses.replace(run, parent=main.name, branch_step=step,
                                         est_time_s=(run.est_time_s - overhead_s) * share + overhead_s)  # fmt: skip
            steps.add(step)
        if steps:
            out[runs.index(main)] = dataclasses.replace(main, branch_steps=tuple(sorted(steps)))
    return out


def launch_priority(runs: list[PlannedRun]) -> dict[str, float]:
    """Run name -> estimated seconds from its start to the end of the runs that wait for it: its
    own ``est_time_s`` plus its longest cooldown branch's (branches start after their main run).

    The runner starts the highest first (longest-processing-time-first scheduling), so that on a
    few slots the largest runs and a wsd main run with its branches do not start last and leave
    the other slots idle at the end.
    """
    longest_branch: dict[str, float] = {}
    for run in runs:
        if run.parent is not None:
            longest_branch[run.parent] = max(longest_branch.get(run.parent, 0.0), run.est_time_s)
    return {run.name: run.est_time_s + longest_branch.get(run.name, 0.0) for run in runs}


def check_epochs(spec: SweepSpec, name: str, cfg: Config, tokens: int, unique: int | None) -> None:
    """ConfigError when a run would pass its data more than ``spec.max_epochs`` times by accident.

    Repeated data is worth less than fresh data (Muennighoff et al. 2023: nearly free only up
    to about 4 epochs), so it biases N_opt upward. A run with data.dataset_tokens set repeats
    its pool on purpose and is not checked; nor is a run whose pool is unknown at plan time.
    """
    if unique is None or cfg.data.dataset_tokens is not None:
        return
    epochs = tokens / unique
    if epochs > spec.max_epochs:
        raise ConfigError(
            f"run {name}: D={tokens:.3g} tokens is {epochs:.1f} epochs of the {unique:.3g} unique training "
            f"tokens of {cfg.data.source}, more than max_epochs={spec.max_epochs:g} (repeated data is worth "
            "less and biases N_opt up): use fewer tokens or a larger corpus (base.data.source=text:<glob>), "
            "or allow it on purpose with the spec key max_epochs or data.dataset_tokens"
        )


def format_plan(spec: SweepSpec, runs: list[PlannedRun]) -> str:
    """The plan table: one row per run (name, shape, N, D, epochs, C, steps, lr, batch, estimated time).

    epochs is D over the unique training tokens ("?" when unknown before the data is tokenised).
    """
    branched = any(r.branch_step is not None for r in runs)
    header = ["name", "d_model", "n_layers", "n_heads", "d_ff", "N", "D", "epochs", f"C[{spec.convention}]", "steps",
              "lr", "batch", "est"] + (["branch"] if branched else [])  # fmt: skip
    rows = [
        [
            r.name,
            str(r.config.model.d_model),
            str(r.config.model.n_layers),
            str(r.config.model.n_heads),
            str(r.config.model.d_ff),
            f"{r.n_params:.3g}",
            f"{r.tokens:.3g}",
            "?" if r.epochs is None else f"{r.epochs:.2g}",
            f"{r.flops:.3g}",
            str(r.steps),
            f"{r.config.optim.lr:.3g}",
            str(r.config.train.batch_size),
            format_duration(r.est_time_s),
        ] + ([_branch_cell(r)] if branched else [])
        for r in runs
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in [header] + rows]
    total = sum(r.est_time_s for r in runs)
    independent = sum(r.flops for r in runs)
    trained = sum(r.trained_flops for r in runs)
    if branched:
        n_branches = sum(r.branch_step is not None for r in runs)
        lines.append(
            f"{n_branches} runs are cooldown branches (C counts the prefix each stands on): the sweep trains "
            f"C = {trained:.3g} FLOPs, against {independent:.3g} as independent runs ({100 * (1 - trained / independent):.0f}% saved)"
        )
    lines.append(
        f"{len(runs)} runs, N = {spec.recipe.count}, total C = {trained:.3g} FLOPs, "
        f"estimated {format_duration(total)} one run at a time at {spec.estimate.flops_per_s:.3g} FLOP/s "
        f"+ {spec.estimate.overhead_s:g}s per run"
    )
    return "\n".join(line.rstrip() for line in lines)


def _branch_cell(run: PlannedRun) -> str:
    """The plan's branch column: "main@S1,S2" for a main run, "branch@S" for a branch (starts after S steps)."""
    if run.branch_steps:
        return "main@" + ",".join(str(s) for s in run.branch_steps)
    return "" if run.branch_step is None else f"branch@{run.branch_step}"


def isoflop_error(run: PlannedRun) -> float:
    """Relative gap between a run's C and its isoflop budget (0 for non-isoflop runs)."""
    return 0.0 if run.budget is None else abs(run.flops / run.budget - 1)

