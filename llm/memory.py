"""Training memory: a pure estimate from the config, and the check that refuses a run that cannot fit.

The estimate counts what one optimiser step keeps alive at its peak, in bytes:

    params + grads + AdamW moments     n_params_total x (1 + 1 + 2) x itemsize(param_dtype)
                                       (+ one more grad-sized buffer when grad_accum > 1: the running sum)
    activations                        micro_batch x seq_len x d_model x n_layers x ACTIVATION_FACTOR
                                       x itemsize(compute_dtype)   (remat: one saved value per layer
                                       plus one block's worth)
    logits                             micro_batch x seq_len x vocab_size x 4   (float32 for the loss)

micro_batch = batch_size / grad_accum. It leaves out attention scores, XLA temporaries and
fragmentation, so it is a floor, not a forecast: a run above it cannot fit; one below it may
still run out of memory. That is the point: refuse the hopeless configs at once (before the
run directory or the model exists) and never refuse one that could have trained.
"""

from __future__ import annotations

import os

from llm import counting
from llm.config import Config, ConfigError

# Values of size d_model saved per token and layer for the backward pass. Korthikanti et al. 2022
# ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1) count 34 bytes per
# token x hidden unit per layer in 16-bit, i.e. 17 values, 2 of them dropout masks we do not have.
ACTIVATION_FACTOR = 16

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def training_bytes(cfg: Config) -> dict[str, int]:
    """Estimated peak training memory of ``cfg`` in bytes, by part (see module docstring), and "total"."""
    m, t = cfg.model, cfg.train
    n = counting.n_params(m)["n_params_total"]
    p = _itemsize(m.param_dtype)
    micro = max(1, t.batch_size // max(1, t.grad_accum))
    tokens = micro * m.seq_len
    saved_per_layer = 1 if m.remat else ACTIVATION_FACTOR
    act_values = tokens * m.d_model * (m.n_layers * saved_per_layer + (ACTIVATION_FACTOR if m.remat else 0))
    parts = {
        "params": n * p,
        "grads": n * p * (2 if t.grad_accum > 1 else 1),
        "adam": 2 * n * p,
        "activations": act_values * _itemsize(m.compute_dtype),
        "logits": tokens * m.vocab_size * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


def population_bytes(cfg: Config, size: int, mode: str) -> int:
    """Estimated peak memory in bytes of ``size`` members of ``cfg`` trained as one population.

    ``vmap`` (llm.population on an accelerator): every member's step runs at once, so all of
    ``training_bytes`` scales with ``size``. ``loop`` (CPU): members step one at a time, so only
    their parameters and AdamW moments are held ``size`` times; gradients, activations and logits once.
    """
    one = training_bytes(cfg)
    if mode == "vmap":
        return size * one["total"]
    kept = one["params"] + one["adam"]
    return size * kept + (one["total"] - kept)


def available_bytes() -> tuple[int | None, str]:
    """(bytes, what) the run may use: the accelerators' memory summed, else the host's physical RAM.

    Summed over local devices so a run sharded across them is never refused; None when unknown.
    """
    try:
        import jax

        devices = jax.local_devices()
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if devices and all(limits):
            kind = devices[0].platform.upper()
            return int(sum(limits)), f"{len(devices)} {kind} device(s)" if len(devices) > 1 else f"{kind} memory"
    except Exception:  # memory_stats is not implemented on every backend (CPU returns None)
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "host RAM"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def _gb(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e6:.2f} MB"


def check_fits(cfg: Config, available: tuple[int | None, str] | None = None) -> dict[str, int]:
    """Raise ConfigError when ``training_bytes(cfg)`` exceeds the available memory; returns the estimate.

    available: (bytes, description), default ``available_bytes()``; an unknown limit passes.
    """
    need = training_bytes(cfg)
    limit, what = available if available is not None else available_bytes()
    if limit is not None and need["total"] > limit:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in need.items() if k != "total")
        raise ConfigError(
            f"model too large for memory: training needs at least {_gb(need['total'])} ({parts}) but {what} "
            f"is {_gb(limit)}; shrink model.* or the micro-batch (train.batch_size / train.grad_accum)"
        )
    return need
