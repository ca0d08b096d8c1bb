"""Train one model and write its run directory (config.yaml, metrics.jsonl, result.json, checkpoints/).

The train step is a pure function of (state, batch) -> (state, metrics), with the state an
explicit pytree {params, opt_state, step}; one compiled program runs up to 32 of them per call
(``make_run_steps``; at most ``log_every``), up to the next step that logs, evaluates or checkpoints. The host loop
only feeds stacks of batches (a pure function of (data seed, step)) and reads metrics back
every ``log_every`` steps, so the accelerator is never waiting on Python in between.

A run executes on a device mesh (``cfg.mesh``, llm.sharding; one device is a mesh of one):
the state is created already sharded, the step is jitted with the state's and the batch's
shardings (the state donated), and each host places only its rows of every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llm import counting
from llm.checkpoint import Checkpoints
from llm.config import Config, ConfigError, ModelConfig, TrainConfig, dump_config, total_steps, validate, without_execution_keys
from llm.layer_stack import restore_state
from llm.typed_yaml import read_yaml, to_dict
from llm.data import load_dataset
from llm.distributed import is_main_process
from llm.metrics import MetricsLog, is_eval_step, peak_flops, truncate_metrics
from rundir import BRANCH_POINTS, CHECKPOINTS, CONFIG, FLOP_CONVENTIONS, METRICS, RESULT, read_result, write_json_atomic, write_text_atomic
from llm.logits import cross_entropy, hidden_state_loss
from llm import sharding
from llm.model import Transformer
from llm.moe import moe_kernel
from llm.optim import learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of ``train``: ``status`` is "done" or "failed"; ``result`` is result.json's content."""

    status: str
    error: str | None
    run_dir: Path
    result: dict[str, Any]


# --------------------------------------------------------------------------- pure functions


def make_loss_fn(graphdef: nnx.GraphDef, z_loss_coef: float):
    """loss(params, tokens_BT1) -> (total loss, metrics); tokens hold inputs and shifted targets."""

    def loss_fn(params, tokens_BT1):
        model = nnx.merge(graphdef, params)
        if model.cfg.logits == "blockwise":
            loss, z_squared, aux = _blockwise_loss(model, tokens_BT1)
        else:
            logits_BTV, aux = model(tokens_BT1[:, :-1])
            loss, z_squared = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
        total = loss + z_loss_coef * z_squared + aux["aux_loss"]
        return total, {"train_loss": loss, **aux["metrics"]}

    return loss_fn


def _blockwise_loss(model: Transformer, tokens_BT1: jax.Array):
    """(loss, mean squared log-partition, aux) of model.logits = blockwise: no full float32 logits."""
    x_BTD, aux = model.hidden(tokens_BT1[:, :-1])
    b, t, d = x_BTD.shape
    loss, z_squared = hidden_state_loss(x_BTD.reshape(b * t, d), model.unembedding(), tokens_BT1[:, 1:].reshape(-1), "blockwise")
    return loss, z_squared, aux


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: Config):
    """Jitted (state, tokens_BT1) -> (state, metrics), with gradient accumulation over micro-batches."""
    return jax.jit(train_step_fn(graphdef, optimizer, cfg), donate_argnums=0)


def make_run_step(graphdef: nnx.GraphDef, cfg: Config, total_steps: int, layout: "sharding.Layout | None" = None):
    """(step, lr_at) for a run of ``total_steps``: ``step(state, tokens_BT1) -> (state, metrics)`` is
    ``make_train_step``'s, with the same numbers, but its compiled program takes the learning rate
    as an argument; ``lr_at(update)`` computes it from the run's schedule in a small program of its
    own. So the train step compiles once per model shape, whatever the run length: the persistent
    compilation cache serves runs of one shape with other token counts, budgets or learning rates.

    With a ``layout`` the step runs on its mesh: the state and batch arrive and the state leaves
    with the layout's shardings, metrics replicated.
    """
    lr_at = jax.jit(learning_rate_schedule(cfg.optim, total_steps))
    step_jit = _jit_state_step(_step_with_lr(graphdef, cfg, total_steps), layout, "batch", n_scalars=1)

    def step(state, tokens_BT1):
        return step_jit(state, tokens_BT1, lr_at(state["step"]))

    return step, lr_at


def _step_with_lr(graphdef: nnx.GraphDef, cfg: Config, total_steps: int):
    """The pure (state, tokens_BT1, lr) -> (state, metrics): the run's step with its learning rate an
    argument (the schedule is evaluated outside, so one program serves every run length)."""

    def step_with_lr(state, tokens_BT1, lr):
        return train_step_fn(graphdef, make_optimizer(cfg.optim, total_steps, lambda count: lr), cfg)(state, tokens_BT1)

    return step_with_lr


def _jit_state_step(fn, layout: "sharding.Layout | None", batch: str, n_scalars: int):
    """``fn(state, tokens, *scalars) -> (state, metrics)`` jitted with the state donated; with a
    ``layout``, on its mesh: the state in and out with its shardings, the tokens as ``layout.<batch>``,
    scalars and metrics replicated."""
    if layout is None:
        return jax.jit(fn, donate_argnums=0)
    return layout.on_mesh(jax.jit(
        fn, donate_argnums=0,
        in_shardings=(layout.state, getattr(layout, batch)) + (layout.replicated,) * n_scalars,
        out_shardings=(layout.state, layout.replicated),
    ))  # fmt: skip


# Most optimiser steps one call of ``make_run_steps``' program runs (its batch stack is this deep).
STEPS_PER_CALL = 32


def call_depth(t: TrainConfig) -> int:
    """How deep a run's stack of batches per call is: a call never runs past a log line, so a
    deeper stack than ``log_every`` would only be built and copied in vain."""
    return min(STEPS_PER_CALL, t.log_every)


def make_run_steps(graphdef: nnx.GraphDef, cfg: Config, total_steps: int, layout: "sharding.Layout | None" = None,
                   steps_per_call: int = STEPS_PER_CALL):  # fmt: skip
    """``run_steps(state, tokens_KBT1, n) -> (state, metrics_K)``: the first ``n`` <= K steps of a
    stack of K batches in one call of one compiled program, K = ``steps_per_call``.

    The steps are ``make_run_step``'s (the same losses to float32 rounding, tested; XLA compiles
    the loop's body on its own; the quickstart's 12 final eval losses came out identical to one step per call), but the host
    dispatches once per n steps: on CPU a tiny model's step takes 2-6 ms and each call of a jitted
    step (flattening the state's leaves, launching the program) cost about 1 ms of host time on
    the same core. ``n`` is an argument, so one program serves every n (the loop stops at each
    log line, evaluation and checkpoint). ``metrics_K`` holds each metric per step in its first
    n entries. The learning rates come from the run's schedule in a small program of their own
    (``make_run_step``'s ``lr_at``, one per run length), so this one compiles once per shape.
    """
    lr_at = jax.jit(learning_rate_schedule(cfg.optim, total_steps))
    lrs_from = jax.jit(lambda first: jax.lax.map(lr_at, first + jnp.arange(steps_per_call)))
    one = _step_with_lr(graphdef, cfg, total_steps)
    steps_with_lrs = steps_in_loop(lambda state, tokens_BT1, i, lrs_K: one(state, tokens_BT1, lrs_K[i]), steps_per_call)
    steps_jit = _jit_state_step(steps_with_lrs, layout, "stacked_batch", n_scalars=2)

    def run_steps(state, tokens_KBT1, n: int):
        if not 1 <= n <= steps_per_call:
            raise ValueError(f"run_steps: n={n} steps, but one call runs 1 to {steps_per_call}")
        return steps_jit(state, tokens_KBT1, lrs_from(state["step"]), jnp.int32(n))

    return run_steps, lr_at


def steps_in_loop(one, steps_per_call: int):
    """``one(state, tokens_BT1, i, args) -> (state, metrics)`` (step i of a call; ``args`` any pytree)
    -> the pure ``steps(state, tokens_KBT1, args, n) -> (state, metrics_K)``: the first n <= K steps
    of a stack of K = ``steps_per_call`` batches in one ``fori_loop``, metrics_K holding each
    metric per step in its first n entries (``make_run_steps``, ``llm.population``)."""

    def steps(state, tokens_KBT1, args, n):
        _, metric_shapes = jax.eval_shape(lambda s, t: one(s, t, 0, args), state, tokens_KBT1[0])
        metrics_K = jax.tree.map(lambda m: jnp.zeros((steps_per_call,) + m.shape, m.dtype), metric_shapes)

        def body(i, carry):
            state, metrics_K = carry
            state, metrics = one(state, tokens_KBT1[i], i, args)
            return state, jax.tree.map(lambda all_K, m: all_K.at[i].set(m), metrics_K, metrics)

        return jax.lax.fori_loop(0, n, body, (state, metrics_K))

    return steps


def train_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: Config):
    """The pure (state, tokens_BT1) -> (state, metrics) step, not jitted (llm.population vmaps it)."""
    loss_fn = make_loss_fn(graphdef, cfg.optim.z_loss_coef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = cfg.train.grad_accum

    def step_fn(state, tokens_BT1):
        params = state["params"]
        if accum == 1:
            (_, metrics), grads = grad_fn(params, tokens_BT1)
        else:
            # Micro-batch a is rows a*m..(a+1)*m-1 of the batch (as on one device); on a mesh each is
            # laid out over the batch axes again, so every device works on every micro-batch.
            micro_ABT1 = sharding.constrain(tokens_BT1.reshape(accum, -1, tokens_BT1.shape[-1]), (None, "batch", "seq"))

            def body(grad_sum, micro_BT1):
                (_, metrics), grads = grad_fn(params, micro_BT1)
                return jax.tree.map(jnp.add, grad_sum, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            grad_sum, metrics_A = jax.lax.scan(body, zeros, micro_ABT1)
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics_A)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step_fn


def make_eval_step(graphdef: nnx.GraphDef, layout: "sharding.Layout | None" = None):
    """Jitted (params, tokens_BT1, valid_B) -> (summed nats, token count) on held-out data.

    Rows with ``valid_B`` False are padding: they add nothing to the loss and, with capacity
    routing, take no expert capacity from the real tokens. With a ``layout`` it runs on its mesh
    (params as the layout shards them, rows split over the batch axes).
    """

    def eval_fn(params, tokens_BT1, valid_B):
        model = nnx.merge(graphdef, params)
        inputs_BT = tokens_BT1[:, :-1]
        valid_BT = jnp.broadcast_to(valid_B[:, None], inputs_BT.shape)
        logits_BTV, _ = model(inputs_BT, valid_BT=valid_BT)
        loss, _ = cross_entropy(logits_BTV, tokens_BT1[:, 1:], valid_BT)
        count = jnp.sum(valid_BT, dtype=jnp.float32)
        return loss * count, count

    if layout is None:
        return jax.jit(eval_fn)
    return layout.on_mesh(jax.jit(
        eval_fn, in_shardings=(layout.state["params"], layout.batch, layout.rows), out_shardings=layout.replicated
    ))


def evaluate(eval_step, params, eval_tokens_NT1: np.ndarray, batch_size: int, layout: "sharding.Layout | None" = None) -> float:
    """Mean held-out loss in nats/token over a fixed set of sequences.

    Runs in batches of ``batch_size`` sequences (the training micro-batch, so eval fits
    wherever training does); the last batch is padded with rows marked invalid. With a
    ``layout`` each batch is placed as the layout says, from this host's rows only.
    """
    n = eval_tokens_NT1.shape[0]
    total, count = 0.0, 0.0
    for start in range(0, n, batch_size):
        chunk = eval_tokens_NT1[start : start + batch_size]
        valid = np.arange(batch_size) < chunk.shape[0]
        if chunk.shape[0] < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - chunk.shape[0], chunk.shape[1]), chunk.dtype)])
        if layout is not None:  # each host places its rows only
            mine = layout.host_rows(batch_size)
            chunk, valid = layout.put(chunk[mine], batch_size), layout.put(valid[mine], batch_size)
        s, c = eval_step(params, chunk, valid)
        total, count = total + float(s), count + float(c)
    return total / count


# --------------------------------------------------------------------------- when to log, evaluate, checkpoint, stop


def should_log(step: int, total_steps: int, log_every: int, eval_every: int) -> bool:
    """Whether a metrics.jsonl line is written after step ``step`` (1-based).

    Every ``log_every`` steps, at every evaluation (its line carries the eval loss), and at the last step.
    """
    return step % log_every == 0 or is_eval_step(step, total_steps, eval_every)


def should_checkpoint(step: int, total_steps: int, checkpoint_every: int) -> bool:
    """Whether a checkpoint is saved after step ``step``: every ``checkpoint_every`` steps and at the last.

    Independent of the logging cadence, so a kill -9 loses at most ``checkpoint_every`` steps, plus
    with asynchronous saves those run while the newest checkpoint was still being written.
    """
    return step % checkpoint_every == 0 or step == total_steps


def steps_to_stop(step: int, total_steps: int, t: TrainConfig, extra_stops: Collection[int] = (),
                  most: int = STEPS_PER_CALL) -> int:  # fmt: skip
    """How many steps to run after step ``step`` before the host must look: up to the next step
    that logs, evaluates, checkpoints or is in ``extra_stops`` (branch points), or the last step,
    and at most ``most``."""
    for n in range(1, most + 1):
        at = step + n
        if at >= total_steps or should_log(at, total_steps, t.log_every, t.eval_every) \
                or should_checkpoint(at, total_steps, t.checkpoint_every) or at in extra_stops:  # fmt: skip
            return min(n, total_steps - step)
    return most


def failure(step: int, train_loss: float, eval_loss: float | None = None) -> str | None:
    """Why the run must stop after ``step`` (a non-finite loss), or None to go on."""
    if not math.isfinite(train_loss):
        return f"non-finite training loss ({train_loss}) at step {step}"
    if eval_loss is not None and not math.isfinite(eval_loss):
        return f"non-finite eval loss ({eval_loss}) at step {step}"
    return None


# --------------------------------------------------------------------------- the run


def _environment() -> tuple[dict[str, Any], dict[str, str]]:
    import flax
    import orbax.checkpoint

    device = jax.devices()[0]
    hardware = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "n_devices": jax.device_count(),
        "host": platform.node(),
    }
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", "unknown"),
    }
    return hardware, versions


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / CONFIG
    if not path.exists():
        return
    if without_execution_keys(read_yaml(path)) != without_execution_keys(to_dict(cfg)):
        raise ConfigError(
            f"{run_dir} already holds a run with a different config.yaml; resume it with the same "
            "config or choose another --run-dir"
        )



def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    run_name: str | None = None,
    branch_from: tuple[str | Path, int] | None = None,
    branch_steps: tuple[int, ...] = (),
) -> RunResult:
    """Train the model described by ``cfg`` and write ``run_dir`` per the run-directory contract.

    Re-running on the same ``run_dir`` resumes from its latest checkpoint (or returns at once
    when result.json already says done). Bad input raises ConfigError before anything is written.

    Cooldown branches (wsd): ``branch_steps`` are steps at which this run keeps a checkpoint in
    ``branch_points/`` for branches to start from. ``branch_from=(parent run dir, step)`` starts
    this run from that checkpoint of the parent (its metrics up to ``step`` copied) instead of
    from scratch; the result is the same as an independent run's (``llm.schedule.branch_mismatch``
    says when that holds), and result.json records ``branch`` (parent name and step). When the
    parent's checkpoint is missing the run trains from scratch, saying so on stderr.
    """
    validate(cfg)
    from llm.memory import check_fits  # a model that cannot fit is refused before anything is built or written
    check_fits(cfg)
    mesh = sharding.make_mesh(cfg)  # a mesh that does not fit the devices is refused here too
    run_dir = Path(run_dir)
    run_name = run_name or run_dir.name
    _check_same_config(run_dir, cfg)
    parent = _branch_parent(cfg, branch_from)
    previous = read_result(run_dir)
    if previous is not None and previous.get("status") == "done":
        return RunResult("done", None, run_dir, previous)

    m, t = cfg.model, cfg.train
    dataset = load_dataset(cfg.data, vocab_size=m.vocab_size, seq_len=m.seq_len, eval_tokens=t.eval_tokens, progress=t.progress)
    steps = total_steps(cfg)
    tokens_per_step = t.batch_size * m.seq_len
    flops_per_token = flops_per_token_by_convention(cfg)

    optimizer = make_optimizer(cfg.optim, steps)
    graphdef, state, layout = init_state(cfg, optimizer, mesh)

    # Nothing was written before this point: bad input leaves the run dir untouched. With several
    # processes (llm.distributed) only process 0 writes the run's files; all of them run every step,
    # evaluation and checkpoint save, which are collectives.
    main = is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG, dump_config(cfg))
        if previous is not None:  # a failed attempt being retried
            (run_dir / RESULT).unlink(missing_ok=True)

    hardware, versions = _environment()
    peak = peak_flops(hardware["device_kind"])
    mfu_flops = counting.mfu_flops_per_token(m)  # the matmul FLOPs the hardware really does
    per_call = call_depth(t)
    run_steps, _ = make_run_steps(graphdef, cfg, steps, layout, steps_per_call=per_call)
    schedule = learning_rate_schedule(cfg.optim, steps)  # the logged lr, as it always was
    eval_step = make_eval_step(graphdef, layout)
    eval_set = np.concatenate(list(dataset.eval_batches(t.batch_size)), axis=0)
    micro_batch = t.batch_size // t.grad_accum  # eval fits wherever a training micro-batch does

    summary = run_summary(cfg, dataset, run_name, moe_kernel(m), hardware, versions, mesh=sharding.mesh_summary(mesh))
    from tqdm import tqdm

    # Leaving this block waits for the last checkpoint's background write (its failure fails the
    # run), so result.json, written after it, never announces a run whose checkpoint is not on disk.
    with Checkpoints(run_dir / CHECKPOINTS, keep=t.keep_checkpoints, asynchronous=t.async_checkpoint) as checkpoints, \
            _branch_points(run_dir, branch_steps, t.async_checkpoint) as points:  # fmt: skip
        start, state, meta = _resume_with_meta(checkpoints, state, run_dir, m)
        if start == 0 and parent is not None:
            start, state, meta = _start_branch(parent, state, run_dir, m)
        earlier_wall, branch = float(meta.get("wall_time_s", 0.0)), meta.get("branch")
        losses = _losses_so_far(run_dir)
        meter = _Throughput(start)
        started = time.perf_counter()

        def save(at: int) -> None:
            meta = {"step": at, "tokens": at * tokens_per_step, "run_name": run_name,
                    "wall_time_s": earlier_wall + time.perf_counter() - started, "branch": branch}  # fmt: skip
            with meter.paused():
                if at in branch_steps:  # kept for the branches, apart from the resume rotation
                    points.save(at, state, meta)
                checkpoints.save(at, state, meta)

        def line(at: int, host: list[dict]) -> dict:  # the metrics.jsonl line for the steps since the last
            record = _record(at, tokens_per_step, flops_per_token, host, float(schedule(at - 1)))
            record["tokens_per_s"] = meter.interval(at, tokens_per_step)
            record["tokens_per_s_per_device"] = record["tokens_per_s"] / mesh.size
            record["mfu"] = record["tokens_per_s"] * mfu_flops / (peak * mesh.size) if peak else None  # the mesh's devices
            return record

        bar = tqdm(total=steps, initial=start, unit="step", disable=not (t.progress and main), file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        log = MetricsLog(run_dir, tensorboard=t.tensorboard) if main else _NoMetricsLog()
        pending: list[tuple[dict[str, jax.Array], int]] = []  # (metrics_K, n) of each call since the last line, on device
        error = None
        step = completed = start
        try:
            mine = layout.host_rows(t.batch_size)  # each host builds and places only its rows
            calls = step_calls(start, steps, t, branch_steps, most=per_call)
            batches = prefetch_to_device(lambda j: stacked_batch(dataset, calls[j], t.batch_size, mine, most=per_call), 0, len(calls),
                                         place=lambda rows: layout.put_stacked(rows, t.batch_size))  # fmt: skip
            for (first, n), batch in zip(calls, batches):
                state, metrics_K = run_steps(state, batch, n)
                step = completed = first + n
                pending.append((metrics_K, n))
                bar.update(n)
                if should_log(step, steps, t.log_every, t.eval_every):
                    record = line(step, fetch_step_metrics(pending))
                    losses.last_train = record["train_loss"]
                    error = failure(step, losses.last_train)
                    if error is None and is_eval_step(step, steps, t.eval_every):
                        with meter.paused():
                            record["eval_loss"] = losses.add_eval(evaluate(eval_step, state["params"], eval_set, micro_batch, layout))
                        error = failure(step, losses.last_train, losses.last_eval)
                    log.write(record)
                    pending = []
                    bar.set_postfix(loss=f"{losses.last_train:.3f}", eval=f"{losses.last_eval:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                    if error:
                        break
                if should_checkpoint(step, steps, t.checkpoint_every) or step in branch_steps:
                    save(step)
        except KeyboardInterrupt:
            # Ctrl-C, or SIGTERM from the sweep runner: keep the work done since the last checkpoint,
            # its metrics line first, so that metrics.jsonl reaches the step the checkpoint holds.
            # With several processes each was interrupted after its own step, and a save all of them
            # do not enter at the same step would hang: they resume from the last periodic one.
            if jax.process_count() > 1:
                bar.write(f"interrupted: a rerun resumes from the last periodic checkpoint (step {checkpoints.latest_step() or 0})")
                raise
            if pending:
                log.write(line(completed, fetch_step_metrics(pending)))
            if completed > (checkpoints.latest_step() or 0):
                bar.write(f"interrupted: saving a checkpoint at step {completed}; rerun the same command to resume")
                save(completed)
            raise
        finally:
            bar.close()
            log.close()

    result = run_result(summary, cfg, dataset, error=error, step=step, losses=losses,
                        wall_time_s=earlier_wall + time.perf_counter() - started,  # all attempts of this run
                        tokens_per_s=meter.steady(), branch=branch)  # fmt: skip
    if main:
        write_json_atomic(run_dir / RESULT, result)
    return RunResult(result["status"], error, run_dir, result)


def init_state(cfg: Config, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """(graphdef, state, layout): the train state {params, opt_state, step} created directly with
    the shardings of ``mesh`` (each device computes only its shards; one device: eagerly), and its Layout.

    The values are those of an eager ``Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))``
    and ``optimizer.init``, bit for bit (llm.layers.normal_param), on any mesh.
    """

    def init():
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))))
    layout = sharding.state_layout(mesh, jax.eval_shape(init))
    if mesh.size == 1:  # eager: the random-number programs are shared across shapes (llm.layers.normal_param)
        return graphdef, jax.device_put(init(), layout.state), layout
    return graphdef, layout.on_mesh(jax.jit(init, out_shardings=layout.state))(), layout


def flops_per_token_by_convention(cfg: Config) -> dict[str, float]:
    """Training FLOPs per token of ``cfg``'s model under each of rundir.FLOP_CONVENTIONS."""
    return {c: float(counting.flops_per_token(cfg.model, c)) for c in FLOP_CONVENTIONS}


def run_summary(cfg: Config, dataset, run_name: str, moe_kernel: str | None, hardware: dict, versions: dict,
                mesh: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The part of result.json known before training: name, length, N, FLOPs per token, data, platform,
    and the device ``mesh`` (llm.sharding.mesh_summary; None: one device, no mesh)."""
    return {
        "run_name": run_name,
        "steps": total_steps(cfg),
        "dataset_tokens": int(dataset.n_train_tokens) if cfg.data.dataset_tokens is not None else None,
        **counting.n_params(cfg.model),
        "flops_per_token": flops_per_token_by_convention(cfg),
        "entropy_rate": dataset.entropy_rate,
        "eval_tokens": dataset.n_eval_tokens,  # what each evaluation really scores
        "eval_tokens_requested": cfg.train.eval_tokens,
        "moe_grouped_matmul": moe_kernel,  # "auto" resolved on this platform; null: dense or capacity routing
        "hardware": hardware,
        "mesh": mesh,
        "versions": versions,
    }


def run_result(summary: dict[str, Any], cfg: Config, dataset, *, error: str | None, step: int, losses: "_Losses",
               wall_time_s: float, tokens_per_s: float | None, branch: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """result.json of a run that stopped after ``step`` (``error``: why it failed, None when done;
    ``branch``: the parent run and step of a wsd cooldown branch)."""
    batch_size = cfg.train.batch_size
    tokens = step * batch_size * cfg.model.seq_len
    n_devices = summary["mesh"]["n_devices"] if summary.get("mesh") else 1
    return {
        "status": "failed" if error else "done",
        "error": error,
        **summary,
        "step": step,
        "tokens": tokens,
        # passes over the unique training pool (corpus tokens only when tasks are mixed in)
        "epochs": tokens * (1.0 - dataset.task_fraction(step, batch_size)) / dataset.n_train_tokens,
        # data.tasks: names, params, requested and achieved (over these steps) token fraction; D counts both
        "data_tasks": dataset.tasks.summary(step, batch_size) if dataset.tasks is not None else None,
        "flops": {c: f * tokens for c, f in summary["flops_per_token"].items()},
        "final_train_loss": losses.last_train,
        "final_eval_loss": losses.last_eval,
        "best_eval_loss": losses.best_eval if math.isfinite(losses.best_eval) else None,
        "wall_time_s": wall_time_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / n_devices if tokens_per_s is not None else None,
        "branch": branch,  # {"parent": run name, "step": S}: started from the parent's checkpoint after S steps
    }


def prefetch_to_device(make_batch: Callable[[int], np.ndarray], first: int, last: int,
                       place: Callable[[np.ndarray], jax.Array] = jax.device_put) -> Iterator[jax.Array]:  # fmt: skip
    """Batches ``first``..``last - 1`` from ``make_batch(i)``, each handed to ``place`` (default
    ``jax.device_put``; on a mesh llm.sharding.Layout.put) at once.

    The loop asks for batch i right after dispatching step i - 1, which runs asynchronously:
    building batch i on the host and its (asynchronous) copy to the device both overlap
    step i - 1, so the step never waits on the host for its input. Nothing is built further
    ahead, so a data error (or an interrupt while building) comes after the steps before it
    have been dispatched, as without prefetching.
    """
    for i in range(first, last):
        yield place(make_batch(i))


def step_calls(start: int, total_steps: int, t: TrainConfig, extra_stops: Collection[int] = (),
               most: int = STEPS_PER_CALL) -> list[tuple[int, int]]:  # fmt: skip
    """The (first step, n steps) of each ``run_steps`` call that takes a run from step ``start`` to
    ``total_steps``: every call ends where the host must look (``steps_to_stop``)."""
    calls, step = [], start
    while step < total_steps:
        n = steps_to_stop(step, total_steps, t, extra_stops, most)
        calls.append((step, n))
        step += n
    return calls


def stacked_batch(dataset, call: tuple[int, int], batch_size: int, rows: slice | None = None,
                  most: int = STEPS_PER_CALL) -> np.ndarray:  # fmt: skip
    """int32 [most, rows, seq_len+1]: the training batches of steps first+1..first+n of ``call``
    = (first, n) (batch i is ``dataset.train_batch(i)``: step s trains on batch s - 1), then zeros
    that ``run_steps`` never reads."""
    first, n = call
    stack = [dataset.train_batch(first + i, batch_size, rows) for i in range(n)]
    return np.concatenate([np.stack(stack), np.zeros((most - n,) + stack[0].shape, stack[0].dtype)])


def fetch_step_metrics(pending: list[tuple[dict[str, jax.Array], int]]) -> list[dict[str, np.ndarray]]:
    """Per-step metrics of the ``run_steps`` calls since the last log line, (metrics_K, n) each,
    fetched in one transfer (one device-to-host copy per call, not one per metric and step)."""
    host = jax.device_get([metrics_K for metrics_K, _ in pending])
    return [{k: v[i] for k, v in metrics_K.items()} for metrics_K, (_, n) in zip(host, pending) for i in range(n)]


def _resume(checkpoints: Checkpoints, state: Any, run_dir: Path, model_cfg: ModelConfig) -> tuple[int, Any, float]:
    """(start step, state, wall seconds of earlier attempts) from the newest complete checkpoint.

    Metrics logged after that checkpoint are dropped; a run with no checkpoint starts over. The
    checkpoint may hold either layer layout (llm.layer_stack): it comes back in ``state``'s.
    """
    start, state, meta = _resume_with_meta(checkpoints, state, run_dir, model_cfg)
    return start, state, float(meta.get("wall_time_s", 0.0))


def _resume_with_meta(checkpoints: Checkpoints, state: Any, run_dir: Path, model_cfg: ModelConfig) -> tuple[int, Any, dict[str, Any]]:
    """``_resume`` with the checkpoint's whole meta (wall seconds of earlier attempts, branch); {} when none."""
    start = checkpoints.resume_step()
    if not start:
        if is_main_process():
            (run_dir / METRICS).unlink(missing_ok=True)  # a run killed before its first checkpoint
        return 0, state, {}
    state, meta = restore_state(checkpoints, start, state, model_cfg)
    if is_main_process():
        truncate_metrics(run_dir, start)
    return start, state, meta


def _branch_points(run_dir: Path, branch_steps: tuple[int, ...], asynchronous: bool):
    """The run's branch_points/ Checkpoints (kept whatever the rotation) when it has ``branch_steps``;
    else a context of None (no folder is created)."""
    if not branch_steps:
        return contextlib.nullcontext()
    return Checkpoints(run_dir / BRANCH_POINTS, keep=None, asynchronous=asynchronous)


def _branch_parent(cfg: Config, branch_from: tuple[str | Path, int] | None) -> tuple[Path, int] | None:
    """(parent run dir, step) of a cooldown branch, checked against the parent's config; ConfigError
    when the branch could not end as an independent run would (llm.schedule.branch_mismatch)."""
    if branch_from is None:
        return None
    from llm.config import load_config
    from llm.schedule import branch_mismatch

    parent_dir, step = Path(branch_from[0]), int(branch_from[1])
    if not (parent_dir / CONFIG).exists():
        raise ConfigError(f"cooldown branch: parent run {parent_dir} has no {CONFIG}")
    problem = branch_mismatch(load_config(parent_dir / CONFIG), cfg, step)
    if problem:
        raise ConfigError(f"cooldown branch from {parent_dir} at step {step}: {problem}")
    return parent_dir, step


def _start_branch(parent: tuple[Path, int], state: Any, run_dir: Path, model_cfg: ModelConfig) -> tuple[int, Any, dict[str, Any]]:
    """Start a cooldown branch: the parent's state after ``step`` steps and its metrics up to there.

    The parent keeps that state in branch_points/ (or, by chance, in checkpoints/); when it has
    neither (a parent trained before the branch was planned, or one that failed early) the
    branch trains from scratch, which ends in the same place at the full cost.
    """
    parent_dir, step = parent
    for folder in (parent_dir / BRANCH_POINTS, parent_dir / CHECKPOINTS):
        if (folder / str(step)).is_dir():
            with Checkpoints(folder, keep=None) as points:
                state, meta = restore_state(points, step, state, model_cfg)  # the parent may scan or not
            break
    else:
        print(f"cooldown branch: {parent_dir} has no checkpoint at step {step}; training from scratch", file=sys.stderr)
        return 0, state, {}
    lines = (parent_dir / METRICS).read_text().splitlines() if (parent_dir / METRICS).exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if is_main_process():
        write_text_atomic(run_dir / METRICS, "".join(line + "\n" for line in kept))
    branch = {"parent": parent_dir.name, "step": step}
    return step, state, {"wall_time_s": float(meta.get("wall_time_s", 0.0)), "branch": branch}


class _NoMetricsLog:
    """MetricsLog of a process other than 0: the same records are computed (so every process takes
    part in the same evaluations), none is written."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _Losses:
    """Last training loss, last and best eval loss so far (nats/token)."""

    last_train: float = math.nan
    last_eval: float = math.nan
    best_eval: float = math.inf

    def add_eval(self, loss: float) -> float:
        self.last_eval, self.best_eval = loss, min(self.best_eval, loss)
        return loss


def _losses_so_far(run_dir: Path) -> _Losses:
    """The losses in metrics.jsonl: a resumed run keeps its history."""
    losses = _Losses()
    path = run_dir / METRICS
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            losses.last_train = record.get("train_loss", losses.last_train)
            if record.get("eval_loss") is not None:
                losses.add_eval(record["eval_loss"])
    return losses


class _Throughput:
    """Training tokens/s per logged interval, and the steady rate over every interval but the
    first (which pays for compilation). Time spent evaluating or checkpointing is not counted."""

    def __init__(self, step: int):
        self._time, self._step, self._first = time.perf_counter(), step, True
        self._seconds, self._tokens = 0.0, 0

    def interval(self, step: int, tokens_per_step: int) -> float:
        """Tokens/s since the previous call (or the start), which ends here."""
        now = time.perf_counter()
        seconds, tokens = max(now - self._time, 1e-9), (step - self._step) * tokens_per_step
        if not self._first:
            self._seconds, self._tokens = self._seconds + seconds, self._tokens + tokens
        self._time, self._step, self._first = now, step, False
        return tokens / seconds

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._time += time.perf_counter() - began

    def steady(self) -> float | None:
        return self._tokens / self._seconds if self._seconds > 0 else None


def _record(step: int, tokens_per_step: int, flops_per_token: dict[str, float], host: list[dict], lr: float) -> dict:
    """One metrics.jsonl line from the per-step metrics gathered since the last line."""
    mean = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
    tokens = step * tokens_per_step
    record = {
        "step": step,
        "tokens": tokens,
        "flops": {c: f * tokens for c, f in flops_per_token.items()},
        "train_loss": mean.pop("train_loss"),
        "lr": lr,
        "grad_norm": mean.pop("grad_norm"),
    }
    moe = {k.removeprefix("moe/"): v for k, v in mean.items() if k.startswith("moe/")}
    if moe:
        record["moe"] = moe
    return record
