"""Train a population: P runs of one shape and length, differing only in POPULATION_KEYS, in one process.

Each member is an ordinary run: it writes its own run directory under the contract
(config.yaml, metrics.jsonl, checkpoints/, result.json), resumes from its own checkpoints
(``llm.training.train`` can finish it alone, and vice versa), and fails alone: a member
whose loss goes non-finite gets its failed result.json and the others go on. What members
share is paid once: the process, the data load, and one compiled step, which takes the
per-member optimiser keys (``optim.lr``, ``optim.weight_decay``) as arrays.

Two ways to run the members, picked per device (``population_mode``) and recorded in each
member's result.json under ``population.mode``:

- ``vmap`` (GPU/TPU): the step is vmapped over stacked parameters and optimiser states, so
  P small models fill the device as one large program.
- ``loop`` (CPU): the members take turns through the same compiled program, each call running
  one member up to the next log line (at most 32 steps, as ``llm.training.train`` does).
  The cores are busy with one small model already (a vmap measured 0.7x-1.3x the aggregate
  tokens/s), so the gain on CPU is the start-up paid once instead of P times.

A population trains on one device: it takes no ``mesh`` (llm.sharding); runs that need a
device mesh train alone (``llm.training.train``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm import counting
from llm.checkpoint import Checkpoints
from llm.config import (POPULATION_KEYS, Config, ConfigError, dump_config, population_signature, total_steps,
                        validate)  # fmt: skip
from llm.data import load_dataset
from llm.metrics import MetricsLog, is_eval_step, peak_flops
from llm.model import Transformer
from llm.optim import learning_rate_schedule, make_optimizer
from llm.training import (RunResult, _check_same_config, _environment, _losses_so_far, _record, _resume, _Throughput,
                          call_depth, evaluate, failure, fetch_step_metrics, make_eval_step, run_result, run_summary,
                          should_checkpoint, should_log, stacked_batch, steps_in_loop, steps_to_stop,
                          train_step_fn)  # fmt: skip
from rundir import CHECKPOINTS, CONFIG, RESULT, read_result, write_json_atomic, write_text_atomic

MODES = ("auto", "vmap", "loop")

# The POPULATION_KEYS the compiled step takes as per-member float32 arrays (the seeds act on the host).
STEP_KEYS = ("optim.lr", "optim.weight_decay")


def population_mode(requested: str = "auto", platform: str | None = None) -> str:
    """``vmap`` or ``loop`` (see the module docstring); ``auto``: loop on CPU, vmap on accelerators."""
    if requested not in MODES:
        raise ConfigError(f"population mode {requested!r} is not known; choose one of {', '.join(MODES)}")
    if requested != "auto":
        return requested
    return "loop" if (platform or jax.default_backend()) == "cpu" else "vmap"


def check_members(cfgs: Sequence[Config]) -> None:
    """ConfigError unless every config differs from the first only in POPULATION_KEYS (naming the key)."""
    if not cfgs:
        raise ConfigError("a population needs at least one member")
    first = population_signature(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        if population_signature(cfg) != first:
            from llm.typed_yaml import flatten, to_dict

            a, b = flatten(to_dict(cfgs[0])), flatten(to_dict(cfg))
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in POPULATION_KEYS)
            raise ConfigError(
                f"population member {i} differs from member 0 in {', '.join(keys) or 'its config'}; members may "
                f"differ only in {', '.join(POPULATION_KEYS)}"
            )


def check_population_fits(cfg: Config, size: int, mode: str, available: tuple[int | None, str] | None = None) -> int:
    """Raise ConfigError when ``size`` members of ``cfg`` exceed the memory; returns the estimate in bytes."""
    from llm.memory import _gb, available_bytes, population_bytes

    need = population_bytes(cfg, size, mode)
    limit, what = available if available is not None else available_bytes()
    if limit is not None and need > limit:
        raise ConfigError(
            f"population too large for memory: {size} members ({mode}) need at least {_gb(need)} but {what} is "
            f"{_gb(limit)}; train fewer members at once"
        )
    return need


def member_datasets(cfgs: Sequence[Config]) -> list:
    """Each member's TokenDataset, loaded once: a text corpus is one pool whatever ``data.seed``
    (members get views that sample with their own seed); a synthetic source draws its pool from
    the seed, so each distinct seed is loaded (generated) once."""
    m, t = cfgs[0].model, cfgs[0].train
    loaded: dict[int, Any] = {}

    def load(data_cfg):
        return load_dataset(data_cfg, vocab_size=m.vocab_size, seq_len=m.seq_len, eval_tokens=t.eval_tokens, progress=t.progress)

    out = []
    for cfg in cfgs:
        seed = cfg.data.seed
        if seed not in loaded:
            if loaded and not cfg.data.source.startswith("synthetic:"):
                loaded[seed] = copy.copy(next(iter(loaded.values())))
                loaded[seed].seed = seed
            else:
                loaded[seed] = load(cfg.data)
        out.append(loaded[seed])
    return out


@dataclasses.dataclass
class _Member:
    """Host-side state of one member: its run directory, data view, writers, losses, and where it is."""

    index: int
    cfg: Config
    run_dir: Path
    run_name: str
    dataset: Any
    summary: dict
    checkpoints: Checkpoints | None = None
    log: MetricsLog | None = None
    losses: Any = None
    start: int = 0
    completed: int = 0
    earlier_wall: float = 0.0
    pending: list = dataclasses.field(default_factory=list)  # per-step metrics since the last line (device)
    error: str | None = None
    live: bool = True

    def hparams(self) -> dict[str, np.ndarray]:
        return {key: np.float32(getattr(self.cfg.optim, key.split(".")[1])) for key in STEP_KEYS}


def make_member_step(graphdef: nnx.GraphDef, cfg: Config):
    """Pure (state, tokens_BT1, hparams) -> (state, metrics): ``llm.training``'s step with the
    optimiser built from ``hparams`` (STEP_KEYS -> traced float32 scalars) instead of constants."""
    steps = total_steps(cfg)

    def member_step(state, tokens_BT1, hparams):
        optim = dataclasses.replace(cfg.optim, **{key.split(".")[1]: hparams[key] for key in STEP_KEYS})
        return train_step_fn(graphdef, make_optimizer(optim, steps), cfg)(state, tokens_BT1)

    return member_step


def make_member_steps(graphdef: nnx.GraphDef, cfg: Config, per_call: int):
    """Pure (state, tokens_KBT1, hparams, n) -> (state, metrics_K): the first n of a stack of
    ``per_call`` member steps in one loop (``llm.training.steps_in_loop``, as a single run)."""
    member_step = make_member_step(graphdef, cfg)
    return steps_in_loop(lambda state, tokens_BT1, i, hparams: member_step(state, tokens_BT1, hparams), per_call)


class _LoopStepper:
    """Members take turns, a call of up to ``per_call`` steps each, through one jitted program (CPU)."""

    def __init__(self, member_steps, states: list, per_call: int):
        self.states, self.per_call = states, per_call
        self._steps = jax.jit(member_steps, donate_argnums=0)

    def steps(self, members: list[_Member], batch_size: int, call: tuple[int, int]) -> None:
        for mb in members:
            batches = stacked_batch(mb.dataset, call, batch_size, most=self.per_call)
            self.states[mb.index], metrics_K = self._steps(self.states[mb.index], batches, mb.hparams(), jnp.int32(call[1]))
            mb.pending.append((metrics_K, call[1]))

    def state(self, i: int):
        return self.states[i]

    def params(self, i: int):
        return self.states[i]["params"]

    @staticmethod
    def host_metrics(pending: list, i: int) -> list[dict]:
        return fetch_step_metrics(pending)


class _VmapStepper:
    """One vmapped call of up to ``per_call`` steps over the stacked member states; members not
    stepping (not yet started here, finished, failed) are masked out and keep their state."""

    def __init__(self, member_steps, states: list, members: list[_Member], per_call: int):
        self.size, self.per_call = len(states), per_call
        self.stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        self.hparams = {k: np.stack([mb.hparams()[k] for mb in members]) for k in STEP_KEYS}

        def masked(state, tokens_KBT1, hparams, active, n):
            new, metrics_K = member_steps(state, tokens_KBT1, hparams, n)
            return jax.tree.map(lambda new_x, old_x: jnp.where(active, new_x, old_x), new, state), metrics_K

        self._steps = jax.jit(jax.vmap(masked, in_axes=(0, 0, 0, 0, None)), donate_argnums=0)
        self._zeros = None

    def steps(self, members: list[_Member], batch_size: int, call: tuple[int, int]) -> None:
        by_index = {mb.index: mb for mb in members}
        batches = []
        for i in range(self.size):
            if i in by_index:
                batches.append(stacked_batch(by_index[i].dataset, call, batch_size, most=self.per_call))
            else:  # a masked lane still needs input of the right shape
                if self._zeros is None:
                    self._zeros = np.zeros_like(stacked_batch(members[0].dataset, call, batch_size, most=self.per_call))
                batches.append(self._zeros)
        active = np.array([i in by_index for i in range(self.size)])
        self.stacked, metrics_PK = self._steps(self.stacked, np.stack(batches), self.hparams, active, jnp.int32(call[1]))
        for mb in members:
            mb.pending.append((metrics_PK, call[1]))

    def state(self, i: int):
        return jax.tree.map(lambda x: x[i], self.stacked)

    def params(self, i: int):
        return jax.tree.map(lambda x: x[i], self.stacked["params"])

    @staticmethod
    def host_metrics(pending: list, i: int) -> list[dict]:
        host = jax.device_get(pending)  # one transfer, then member i's lane sliced on the host
        return fetch_step_metrics([({k: v[i] for k, v in metrics_PK.items()}, n) for metrics_PK, n in host])


def train_population(
    cfgs: Sequence[Config],
    run_dirs: Sequence[str | Path],
    *,
    run_names: Sequence[str] | None = None,
    mode: str = "auto",
) -> list[RunResult]:
    """Train every member (``cfgs[i]`` into ``run_dirs[i]``) in this process; one RunResult each, in order.

    Members must differ only in POPULATION_KEYS (ConfigError otherwise, before anything is
    written). A member already done is returned as it is; the others resume from their own
    checkpoints. ``mode``: ``auto`` (per device), ``vmap`` or ``loop``.
    """
    cfgs = [validate(c) for c in cfgs]
    run_dirs = [Path(d) for d in run_dirs]
    run_names = list(run_names) if run_names is not None else [d.name for d in run_dirs]
    if not (len(cfgs) == len(run_dirs) == len(run_names)):
        raise ConfigError(f"a population needs one run dir and name per config: {len(cfgs)} configs, "
                          f"{len(run_dirs)} run dirs, {len(run_names)} names")  # fmt: skip
    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise ConfigError("two population members share a run directory")
    check_members(cfgs)
    from llm.memory import check_fits

    check_fits(cfgs[0])
    mode = population_mode(mode)
    results: dict[int, RunResult] = {}
    todo = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        _check_same_config(run_dir, cfg)
        previous = read_result(run_dir)
        if previous is not None and previous.get("status") == "done":
            results[i] = RunResult("done", None, run_dir, previous)
        else:
            todo.append(i)
    if todo:
        check_population_fits(cfgs[0], len(todo), mode)
        trained = _train_members([cfgs[i] for i in todo], [run_dirs[i] for i in todo], [run_names[i] for i in todo], mode)
        results.update(zip(todo, trained))
    return [results[i] for i in range(len(cfgs))]


def _train_members(cfgs: list[Config], run_dirs: list[Path], run_names: list[str], mode: str) -> list[RunResult]:
    """The population's training loop over members none of which is done yet."""
    cfg = cfgs[0]
    m, t = cfg.model, cfg.train
    datasets = member_datasets(cfgs)
    dataset = datasets[0]
    steps = total_steps(cfg)
    tokens_per_step = t.batch_size * m.seq_len
    hardware, versions = _environment()
    population = {"size": len(cfgs), "mode": mode, "members": list(run_names),
                  "varies": [k for k in POPULATION_KEYS if len({_value(c, k) for c in cfgs}) > 1]}  # fmt: skip

    members, states, graphdef = [], [], None
    for i, (c, run_dir, name, view) in enumerate(zip(cfgs, run_dirs, run_names, datasets)):
        model = Transformer(m, rngs=nnx.Rngs(c.train.seed))
        graphdef, params = nnx.split(model)
        optimizer = make_optimizer(c.optim, steps)
        states.append({"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)})
        summary = run_summary(c, view, name, model.moe_kernel(), hardware, versions)
        summary["population"] = {**population, "index": i}
        members.append(_Member(i, c, run_dir, name, view, summary))

    # Nothing was written before this point: bad input leaves every run dir untouched.
    for mb in members:
        mb.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(mb.run_dir / CONFIG, dump_config(mb.cfg))
        (mb.run_dir / RESULT).unlink(missing_ok=True)  # a failed attempt being retried

    peak = peak_flops(hardware["device_kind"])
    mfu_flops = counting.mfu_flops_per_token(m)
    eval_step = make_eval_step(graphdef)
    eval_set = np.concatenate(list(dataset.eval_batches(t.batch_size)), axis=0)
    micro_batch = t.batch_size // t.grad_accum
    schedules = [learning_rate_schedule(mb.cfg.optim, steps) for mb in members]

    with contextlib.ExitStack() as stack:
        for mb in members:
            mb.checkpoints = stack.enter_context(Checkpoints(mb.run_dir / CHECKPOINTS, keep=t.keep_checkpoints,
                                                                   asynchronous=t.async_checkpoint))
            mb.start, states[mb.index], mb.earlier_wall = _resume(mb.checkpoints, states[mb.index], mb.run_dir, m)
            mb.completed = mb.start
            mb.losses = _losses_so_far(mb.run_dir)
            mb.log = stack.enter_context(contextlib.closing(MetricsLog(mb.run_dir, tensorboard=t.tensorboard)))
        per_call = call_depth(t)  # as llm.training.train
        member_steps = make_member_steps(graphdef, cfg, per_call)
        stepper = (_VmapStepper(member_steps, states, members, per_call) if mode == "vmap"
                   else _LoopStepper(member_steps, states, per_call))  # fmt: skip
        del states  # the stepper owns them (a vmap stacks and donates them)
        first = min(mb.start for mb in members)
        meter = _Throughput(first)
        started = time.perf_counter()

        def save(mb: _Member, at: int) -> None:
            meta = {"step": at, "tokens": at * tokens_per_step, "run_name": mb.run_name,
                    "wall_time_s": mb.earlier_wall + time.perf_counter() - started}  # fmt: skip
            with meter.paused():
                mb.checkpoints.save(at, stepper.state(mb.index), meta)

        def line(mb: _Member, at: int, rate: float) -> dict:
            record = _record(at, tokens_per_step, mb.summary["flops_per_token"],
                             stepper.host_metrics(mb.pending, mb.index), float(schedules[mb.index](at - 1)))  # fmt: skip
            record["tokens_per_s"] = rate
            record["mfu"] = rate * mfu_flops / (peak * hardware["n_devices"]) if peak else None
            mb.pending = []
            return record

        def finish(mb: _Member) -> None:
            mb.live = False
            mb.checkpoints.wait()  # result.json only once its last checkpoint is on disk
            result = run_result(mb.summary, mb.cfg, mb.dataset, error=mb.error, step=mb.completed, losses=mb.losses,
                                wall_time_s=mb.earlier_wall + time.perf_counter() - started,
                                tokens_per_s=meter.steady())  # fmt: skip
            result["population"]["tokens_per_s"] = _times(meter.steady(), len(members))
            write_json_atomic(mb.run_dir / RESULT, result)

        from tqdm import tqdm

        bar = tqdm(total=steps, initial=first, unit="step", disable=not t.progress, file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5, desc=f"population of {len(members)}")  # fmt: skip
        try:
            at = first
            while at < steps:
                live = [mb for mb in members if mb.live]
                if not live:
                    break
                if all(mb.start > at for mb in live):  # the members stepping so far failed: on to the next resume point
                    at = min(mb.start for mb in live)
                    meter.interval(at, 0)  # the steps skipped trained nothing
                    continue
                stepping = [mb for mb in live if mb.start <= at]
                # a call stops where a member joins (resumes), as at a log line or checkpoint
                n = steps_to_stop(at, steps, t, {mb.start for mb in live if mb.start > at}, most=per_call)
                stepper.steps(stepping, t.batch_size, (at, n))
                at += n
                bar.update(n)
                for mb in stepping:
                    mb.completed = at
                if should_log(at, steps, t.log_every, t.eval_every):
                    rate = meter.interval(at, tokens_per_step)  # per member: each trained these tokens in this time
                    for mb in stepping:
                        _log_member(mb, at, steps, line(mb, at, rate), meter, eval_step, stepper, eval_set, micro_batch)
                        if mb.error:
                            finish(mb)
                    bar.set_postfix(loss=f"{np.nanmean([mb.losses.last_train for mb in stepping]):.3f}",
                                    tok_s=f"{_times(rate, len(stepping)):,.0f}")  # fmt: skip
                if should_checkpoint(at, steps, t.checkpoint_every):
                    for mb in stepping:
                        if mb.live:
                            save(mb, at)
        except KeyboardInterrupt:
            # As llm.training.train: keep each member's work since its last checkpoint, metrics line first.
            for mb in members:
                if mb.live and mb.pending:
                    mb.log.write(line(mb, mb.completed, meter.interval(mb.completed, tokens_per_step)))
                if mb.live and mb.completed > (mb.checkpoints.latest_step() or 0):
                    save(mb, mb.completed)
            raise
        finally:
            bar.close()
        for mb in members:
            if mb.live:
                finish(mb)
    return [RunResult("failed" if mb.error else "done", mb.error, mb.run_dir, read_result(mb.run_dir)) for mb in members]


def _log_member(mb: _Member, step: int, steps: int, record: dict, meter, eval_step, stepper, eval_set, micro_batch: int) -> None:
    """Write one member's metrics line (with its eval loss on eval steps); sets ``mb.error`` on a non-finite loss."""
    t = mb.cfg.train
    mb.losses.last_train = record["train_loss"]
    mb.error = failure(step, mb.losses.last_train)
    if mb.error is None and is_eval_step(step, steps, t.eval_every):
        with meter.paused():
            params = stepper.params(mb.index)
            record["eval_loss"] = mb.losses.add_eval(evaluate(eval_step, params, eval_set, micro_batch))
        mb.error = failure(step, mb.losses.last_train, mb.losses.last_eval)
    mb.log.write(record)


def _value(cfg: Config, dotted: str) -> Any:
    section, leaf = dotted.split(".")
    return getattr(getattr(cfg, section), leaf)


def _times(rate: float | None, n: int) -> float | None:
    return None if rate is None else rate * n
