"""Train one model and write its run directory (config.yaml, metrics.jsonl, result.json, checkpoints/).

The train step is a pure function of (state, batch) -> (state, metrics), jitted once,
with the state an explicit pytree {params, opt_state, step}. The host loop only
feeds batches (a pure function of (data seed, step)) and reads metrics back every
``log_every`` steps, so the accelerator is never waiting on Python in between.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llm import counting
from llm.checkpoint import Checkpoints
from llm.config import Config, ConfigError, dump_config, total_steps, validate
from llm.typed_yaml import read_yaml, to_dict
from llm.data import load_dataset
from llm.metrics import MetricsLog, eval_steps, peak_flops, truncate_metrics
from rundir import FLOP_CONVENTIONS, read_result, write_json_atomic, write_text_atomic
from llm.model import Transformer
from llm.optim import learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of ``train``: ``status`` is "done" or "failed"; ``result`` is result.json's content."""

    status: str
    error: str | None
    run_dir: Path
    result: dict[str, Any]


# --------------------------------------------------------------------------- pure functions


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token loss (nats/token) and mean squared log-partition (for z-loss), in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z_BT - target_logit_BT), jnp.mean(log_z_BT**2)


def make_loss_fn(graphdef: nnx.GraphDef, z_loss_coef: float):
    """loss(params, tokens_BT1) -> (total loss, metrics); tokens hold inputs and shifted targets."""

    def loss_fn(params, tokens_BT1):
        model = nnx.merge(graphdef, params)
        logits_BTV, aux = model(tokens_BT1[:, :-1])
        loss, z_squared = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
        total = loss + z_loss_coef * z_squared + aux["aux_loss"]
        return total, {"train_loss": loss, **aux["metrics"]}

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: Config):
    """Jitted (state, tokens_BT1) -> (state, metrics), with gradient accumulation over micro-batches."""
    loss_fn = make_loss_fn(graphdef, cfg.optim.z_loss_coef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = cfg.train.grad_accum

    def step_fn(state, tokens_BT1):
        params = state["params"]
        if accum == 1:
            (_, metrics), grads = grad_fn(params, tokens_BT1)
        else:
            micro_ABT1 = tokens_BT1.reshape(accum, -1, tokens_BT1.shape[-1])

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

    return jax.jit(step_fn, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef):
    """Jitted (params, tokens_BT1, weight_B) -> (summed nats, token count) on held-out data."""

    def eval_fn(params, tokens_BT1, weight_B):
        model = nnx.merge(graphdef, params)
        logits_BTV, _ = model(tokens_BT1[:, :-1])
        logits_BTV = logits_BTV.astype(jnp.float32)
        log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logits_BTV, tokens_BT1[:, 1:, None], axis=-1)[..., 0]
        nll_BT = (log_z_BT - target_BT) * weight_B[:, None]
        return jnp.sum(nll_BT), jnp.sum(weight_B) * tokens_BT1.shape[1] - jnp.sum(weight_B)

    return jax.jit(eval_fn)


def evaluate(eval_step, params, eval_tokens_NT1: np.ndarray, batch_size: int) -> float:
    """Mean held-out loss in nats/token over a fixed set of sequences (padded to whole batches)."""
    n = eval_tokens_NT1.shape[0]
    total, count = 0.0, 0.0
    for start in range(0, n, batch_size):
        chunk = eval_tokens_NT1[start : start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if chunk.shape[0] < batch_size:
            weight[chunk.shape[0] :] = 0.0
            chunk = np.concatenate([chunk, np.zeros((batch_size - chunk.shape[0], chunk.shape[1]), chunk.dtype)])
        s, c = eval_step(params, chunk, weight)
        total, count = total + s, count + c
    return float(total) / float(count)


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
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    old = read_yaml(path)
    new = to_dict(cfg)
    for section in (old, new):  # cosmetic keys may change between a run and its resume
        section.get("train", {}).pop("progress", None)
    if old != new:
        raise ConfigError(
            f"{run_dir} already holds a run with a different config.yaml; resume it with the same "
            "config or choose another --run-dir"
        )



def train(cfg: Config, run_dir: str | Path, *, run_name: str | None = None) -> RunResult:
    """Train the model described by ``cfg`` and write ``run_dir`` per the run-directory contract.

    Re-running on the same ``run_dir`` resumes from its latest checkpoint (or returns at once
    when result.json already says done). Bad input raises ConfigError before anything is written.
    """
    validate(cfg)
    from llm.memory import check_fits  # a model that cannot fit is refused before anything is built or written
    check_fits(cfg)
    run_dir = Path(run_dir)
    run_name = run_name or run_dir.name
    _check_same_config(run_dir, cfg)
    previous = read_result(run_dir)
    if previous is not None and previous.get("status") == "done":
        return RunResult("done", None, run_dir, previous)

    m, t = cfg.model, cfg.train
    dataset = load_dataset(cfg.data, vocab_size=m.vocab_size, seq_len=m.seq_len, eval_tokens=t.eval_tokens, progress=t.progress)
    steps = total_steps(cfg)
    tokens_per_step = t.batch_size * m.seq_len
    counts = counting.n_params(m)
    flops_per_token = {c: float(counting.flops_per_token(m, c)) for c in FLOP_CONVENTIONS}

    model = Transformer(m, rngs=nnx.Rngs(t.seed))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(cfg.optim, steps)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    schedule = learning_rate_schedule(cfg.optim, steps)

    # Nothing was written before this point: bad input leaves the run dir untouched.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    if previous is not None:  # a failed attempt being retried
        (run_dir / "result.json").unlink()
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=t.keep_checkpoints)
    start = checkpoints.latest_step() or 0
    earlier_wall = 0.0
    if start:
        state, meta = checkpoints.restore(start, state)
        earlier_wall = float(meta.get("wall_time_s", 0.0))
        truncate_metrics(run_dir, start)
    else:
        metrics_path = run_dir / "metrics.jsonl"
        if metrics_path.exists():
            metrics_path.unlink()  # a run killed before its first checkpoint starts over
    best_eval, last_eval, last_train = _losses_so_far(run_dir)

    hardware, versions = _environment()
    peak = peak_flops(hardware["device_kind"])
    mfu_flops = counting.mfu_flops_per_token(m)  # the matmul FLOPs the hardware really does
    train_step = make_train_step(graphdef, optimizer, cfg)
    eval_step = make_eval_step(graphdef)
    eval_set = np.concatenate(list(dataset.eval_batches(t.batch_size)), axis=0)
    eval_at = eval_steps(steps, t.eval_every)
    log = MetricsLog(run_dir, tensorboard=t.tensorboard)

    summary = {
        "run_name": run_name,
        "steps": steps,
        "dataset_tokens": int(dataset.n_train_tokens) if cfg.data.dataset_tokens is not None else None,
        **counts,
        "flops_per_token": flops_per_token,
        "entropy_rate": dataset.entropy_rate,
        "moe_grouped_matmul": model.moe_kernel(),  # "auto" resolved on this platform; null: dense or capacity routing
        "hardware": hardware,
        "versions": versions,
    }
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, unit="step", disable=not t.progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    started = time.perf_counter()
    pending: list[dict[str, jax.Array]] = []
    last_record_time, last_record_step = time.perf_counter(), start
    steady_seconds, steady_tokens, first_interval = 0.0, 0, True
    error = None
    step = completed = start

    def save_checkpoint(at: int) -> None:
        meta = {"step": at, "tokens": at * tokens_per_step, "run_name": run_name,
                "wall_time_s": earlier_wall + time.perf_counter() - started}  # fmt: skip
        checkpoints.save(at, state, meta)

    try:
        for step in range(start + 1, steps + 1):
            batch = dataset.train_batch(step - 1, t.batch_size)
            state, step_metrics = train_step(state, batch)
            completed = step
            pending.append(step_metrics)
            bar.update(1)
            is_eval = step in eval_at
            if not (is_eval or step % t.log_every == 0 or step == steps):
                continue
            host = jax.device_get(pending)
            pending = []
            now = time.perf_counter()
            interval_tokens = (step - last_record_step) * tokens_per_step
            tokens_per_s = interval_tokens / max(now - last_record_time, 1e-9)
            if not first_interval:  # the first interval pays for compilation
                steady_seconds += now - last_record_time
                steady_tokens += interval_tokens
            first_interval = False
            record = _record(step, tokens_per_step, flops_per_token, host, float(schedule(step - 1)))
            record["tokens_per_s"] = tokens_per_s
            record["mfu"] = tokens_per_s * mfu_flops / (peak * hardware["n_devices"]) if peak else None
            last_train = record["train_loss"]
            if not math.isfinite(last_train):
                error = f"non-finite training loss ({last_train}) at step {step}"
            if is_eval and error is None:
                last_eval = evaluate(eval_step, state["params"], eval_set, t.batch_size)
                record["eval_loss"] = last_eval
                best_eval = min(best_eval, last_eval)
                if not math.isfinite(last_eval):
                    error = f"non-finite eval loss ({last_eval}) at step {step}"
            log.write(record)
            bar.set_postfix(loss=f"{last_train:.3f}", eval=f"{last_eval:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            last_record_time, last_record_step = time.perf_counter(), step
            if error:
                break
            if step % t.checkpoint_every == 0 or step == steps:
                save_checkpoint(step)
                last_record_time = time.perf_counter()
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM from the sweep runner: keep the work done since the last checkpoint.
        if completed > (checkpoints.latest_step() or 0):
            bar.write(f"interrupted: saving a checkpoint at step {completed}; rerun the same command to resume")
            save_checkpoint(completed)
        raise
    finally:
        bar.close()
        log.close()
        checkpoints.close()

    wall = earlier_wall + time.perf_counter() - started  # all attempts of this run
    done_steps = step
    steady_tps = steady_tokens / steady_seconds if steady_seconds > 0 else None
    tokens = done_steps * tokens_per_step
    result = {
        "status": "failed" if error else "done",
        "error": error,
        **summary,
        "step": done_steps,
        "tokens": tokens,
        "flops": {c: f * tokens for c, f in flops_per_token.items()},
        "final_train_loss": last_train,
        "final_eval_loss": last_eval,
        "best_eval_loss": best_eval if math.isfinite(best_eval) else None,
        "wall_time_s": wall,
        "tokens_per_s": steady_tps,
    }
    write_json_atomic(run_dir / "result.json", result)
    return RunResult(result["status"], error, run_dir, result)


def _losses_so_far(run_dir: Path) -> tuple[float, float, float]:
    """(best eval, last eval, last train) loss in metrics.jsonl: a resumed run keeps its history."""
    best_eval, last_eval, last_train = math.inf, math.nan, math.nan
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            last_train = record.get("train_loss", last_train)
            if record.get("eval_loss") is not None:
                last_eval = record["eval_loss"]
                best_eval = min(best_eval, last_eval)
    return best_eval, last_eval, last_train


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
