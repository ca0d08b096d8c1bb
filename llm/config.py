"""Typed, frozen run configuration, loaded from YAML with ``key=value`` overrides.

One ``Config`` fully describes a training run: ``model``, ``data``, ``optim`` and
``train`` sections. Unknown keys, wrong types and impossible shapes raise
``ConfigError`` with a one-line message naming the key (and a did-you-mean), so
the command line can exit with status 2 before anything touches the disk.

The loader (``from_dict``) is generic over frozen dataclasses, so the sweep
spec reuses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rundir import did_you_mean


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed MLPs (Switch / Mixtral / DeepSeek style) in place of dense MLPs."""

    n_experts: int = 8
    top_k: int = 2  # 1 = Switch, 2 = Mixtral-style
    every: int = 1  # MoE in every n-th block (blocks every-1, 2*every-1, ...); dense elsewhere
    d_ff_expert: int | None = None  # None: model.d_ff
    n_shared: int = 0  # always-on shared experts
    capacity_factor: float | None = None  # None: dropless; number: capacity dispatch (drops overflow)
    grouped_matmul: str = "ragged_dot"  # dropless kernel: ragged_dot (portable) | blocked (MegaBlocks-style, ~4x faster on CPU)
    load_balance_coef: float = 0.01
    router_z_coef: float = 0.001


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape. Dims use the paper notation."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (plain MHA); fewer: grouped-query attention
    d_ff: int = 512
    vocab_size: int = 256
    seq_len: int = 128
    mlp: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    compute_dtype: str = "bfloat16"  # activations/matmuls; params stay float32
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass
    moe: MoEConfig | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are split and sampled."""

    source: str = "builtin:english"  # builtin:kjv|gcide|english (KJV + GCIDE, 33 MB) | text:<glob> | tfds:<name>[/<config>] | synthetic:<name>
    tokenizer: str = "bytes"  # bytes | bpe (byte-level BPE trained locally, vocab = model.vocab_size)
    seed: int = 0  # batch i is a pure function of (seed, i)
    dataset_tokens: int | None = None  # cap the unique training pool (repeated-data runs)
    eval_fraction: float = 0.01  # share of documents held out
    cache_dir: str | None = None  # tokenised files; None: $CHINCHAX_CACHE or ~/.cache/chinchax
    tfds_data_dir: str | None = None
    tfds_manual_dir: str | None = None
    tfds_split: str = "train"
    text_key: str = "text"  # feature holding the text in TFDS examples
    markov_alpha: float = 0.3  # synthetic:markov: Dirichlet concentration of each row (small = low entropy)
    markov_support: int = 16  # synthetic:markov: possible successors per token


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup then a schedule over exactly the run's length."""

    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # floor of cosine / end of wsd decay, as a fraction of lr
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clip; None: off
    z_loss_coef: float = 0.0  # output z-loss, PaLM-style (1e-4 is typical)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length, batching, evaluation, logging and checkpointing of one run."""

    batch_size: int = 16  # sequences per optimiser step (after accumulation)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    steps: int | None = None  # exactly one of steps / tokens
    tokens: int | None = 2_000_000  # D: training tokens; steps = ceil(tokens / (batch_size * seq_len))
    seed: int = 0  # parameter init
    eval_every: int = 100  # regular evals, plus log-spaced early evals
    eval_tokens: int = 32768  # size of the fixed held-out evaluation set
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """A fully resolved training run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()


# --------------------------------------------------------------------------- generic loading



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [o for o in options if o is not type(None)]
        if len(concrete) == 1:
            # Optional[X]: X's own error names the bad key (e.g. a typo inside model.moe).
            return _coerce(value, concrete[0], where)
        for option in concrete:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got null")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if isinstance(value, str) and tp in (int, float):
        value = _number_from_string(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # YAML reads 1e6 as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _number_from_string(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a nested mapping; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(
                f"unknown config key '{name}'{did_you_mean(str(key), list(fields))}; "
                f"allowed keys here: {allowed}"
            )
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config dataclass (YAML/JSON ready)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.d_model=256)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars)."""
    data = _deep_copy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    return data


# --------------------------------------------------------------------------- the run config


_MLPS = ("swiglu", "gelu")
_SCHEDULES = ("cosine", "wsd", "constant")
_TOKENIZERS = ("bytes", "bpe")
_DTYPES = ("float32", "bfloat16", "float16")


def _one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{name}={value!r} is not allowed{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}"
        )


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> Config:
    """Check cross-field constraints; return ``cfg`` unchanged or raise ConfigError."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for rotary positions")
    if m.n_kv_heads is not None:
        _positive("model.n_kv_heads", m.n_kv_heads)
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    _one_of("model.mlp", m.mlp, _MLPS)
    _one_of("model.compute_dtype", m.compute_dtype, _DTYPES)
    _one_of("model.param_dtype", m.param_dtype, _DTYPES)
    if m.moe is not None:
        e = m.moe
        _positive("model.moe.n_experts", e.n_experts)
        _positive("model.moe.every", e.every)
        _positive("model.moe.d_ff_expert", e.d_ff_expert)
        _positive("model.moe.n_shared", e.n_shared, allow_zero=True)
        _positive("model.moe.capacity_factor", e.capacity_factor)
        _positive("model.moe.load_balance_coef", e.load_balance_coef, allow_zero=True)
        _positive("model.moe.router_z_coef", e.router_z_coef, allow_zero=True)
        _one_of("model.moe.grouped_matmul", e.grouped_matmul, ("ragged_dot", "blocked"))
        if not 1 <= e.top_k <= e.n_experts:
            raise ConfigError(f"model.moe.top_k={e.top_k} must be between 1 and n_experts={e.n_experts}")
        if e.every > m.n_layers:
            raise ConfigError(f"model.moe.every={e.every} exceeds model.n_layers={m.n_layers}: no block would be MoE")
    _one_of("data.tokenizer", d.tokenizer, _TOKENIZERS)
    synthetic = d.source.startswith("synthetic:")  # token ids come straight from the source
    if d.tokenizer == "bytes" and m.vocab_size != 256 and not synthetic:
        raise ConfigError(f"data.tokenizer=bytes needs model.vocab_size=256, got {m.vocab_size}")
    if d.tokenizer == "bpe" and synthetic:
        raise ConfigError(f"data.tokenizer=bpe does not apply to {d.source}: synthetic sources emit token ids "
                          "directly; use data.tokenizer=bytes")
    if d.tokenizer == "bpe" and m.vocab_size < 260 and not synthetic:
        raise ConfigError(f"data.tokenizer=bpe needs model.vocab_size >= 260 (256 bytes + specials), got {m.vocab_size}")
    if ":" not in d.source:
        raise ConfigError(
            f"data.source={d.source!r} needs a scheme: builtin:<name>, text:<path or glob>, "
            "tfds:<name>[/<config>] or synthetic:<name>"
        )
    _one_of("data.source scheme", d.source.split(":", 1)[0], ("builtin", "text", "tfds", "synthetic"))
    _positive("data.dataset_tokens", d.dataset_tokens)
    _positive("data.markov_alpha", d.markov_alpha)
    if d.markov_support < 2:
        raise ConfigError(f"data.markov_support must be >= 2, got {d.markov_support}")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    _positive("optim.lr", o.lr)
    _one_of("optim.schedule", o.schedule, _SCHEDULES)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 <= o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    _positive("optim.grad_clip", o.grad_clip)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.z_loss_coef", o.z_loss_coef, allow_zero=True)
    for name in ("batch_size", "grad_accum", "eval_every", "eval_tokens", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"train.{name}", getattr(t, name))
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if (t.steps is None) == (t.tokens is None):
        raise ConfigError("set exactly one of train.steps and train.tokens (the other to null)")
    _positive("train.steps", t.steps)
    _positive("train.tokens", t.tokens)
    return cfg


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Typed, validated ``Config`` from a nested mapping."""
    data = _deep_copy(dict(data or {}))
    # Setting one of steps/tokens switches the other off, so `train.steps=100` just works.
    train = data.get("train")
    if isinstance(train, dict):
        if "steps" in train and train["steps"] is not None and "tokens" not in train:
            train["tokens"] = None
    return validate(from_dict(Config, data))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a run config: defaults, then the YAML file (if any), then ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    # An override of train.steps also switches tokens off (and vice versa).
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    train = data.setdefault("train", {}) if isinstance(data.get("train", {}), dict) else data["train"]
    if isinstance(train, dict):
        if "train.steps" in keys and "train.tokens" not in keys and train.get("steps") is not None:
            train["tokens"] = None
        if "train.tokens" in keys and "train.steps" not in keys and train.get("tokens") is not None:
            train["steps"] = None
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    """YAML text of a config, loadable by ``load_config``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def total_steps(cfg: Config) -> int:
    """Optimiser steps in the run: ``train.steps`` or ceil(tokens / tokens_per_step)."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    per_step = cfg.train.batch_size * cfg.model.seq_len
    return max(1, -(-cfg.train.tokens // per_step))


def tokens_per_step(cfg: Config) -> int:
    """Training tokens consumed by one optimiser step (batch_size * seq_len)."""
    return cfg.train.batch_size * cfg.model.seq_len
