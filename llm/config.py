"""Typed, frozen run configuration, loaded from YAML with ``key=value`` overrides.

One ``Config`` fully describes a training run: ``model``, ``data``, ``optim`` and
``train`` sections. Unknown keys, wrong types and impossible shapes raise
``ConfigError`` with a one-line message naming the key (and a did-you-mean), so
the command line can exit with status 2 before anything touches the disk.

The strict loader itself (YAML, overrides, ``from_dict``, ``ConfigError``) lives in
``llm.typed_yaml``, shared with the sweep spec; this module holds the run config only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

# ConfigError is re-exported: most of llm catches it from here.
from llm.typed_yaml import ConfigError, apply_overrides, deep_copy, from_dict, read_yaml, to_dict
from rundir import did_you_mean

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
    # Expert parallelism, dropless routing: all-to-all slots per (source shard, expert) =
    # ceil(ep_capacity_factor * shard tokens * top_k / n_experts); None: the shard's tokens (never drops)
    ep_capacity_factor: float | None = None
    grouped_matmul: str = "auto"  # dropless kernel: auto (ragged_dot on TPU, blocked on CPU/GPU) | ragged_dot | blocked
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
    scan_layers: bool = False  # run the repeating blocks as one jax.lax.scan: compile time independent of depth
    logits: str = "full"  # full: float32 [B, T, V] logits | blockwise: the loss a block of tokens at a time (llm.logits)
    moe: MoEConfig | None = None


@dataclasses.dataclass(frozen=True)
class TaskMixConfig:
    """Generated tasks (``llm.tasks``) mixed into the training stream (issue 10).

    A ``fraction`` of the training sequences of every run come from a pool of task
    documents (train items only, unless the task is memorisation), tokenised with the
    run's tokenizer; the held-out split (eval loss) stays pure corpus text.
    """

    names: tuple[str, ...] = ()  # llm.tasks registry names, e.g. [facts, add3_reversed]
    params: dict[str, dict[str, Any]] | None = None  # per name: get_task parameters, e.g. {facts: {n_keys: 768}}
    fraction: float = 0.1  # share of training sequences (= tokens) that are task text
    seed: int = 0  # task item stream and the choice of task rows; batch i is a function of (data seed, seed, i)
    pool_tokens: int = 1_000_000  # task tokens generated per run (split equally between tasks); windows drawn from it


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
    tasks: TaskMixConfig | None = None  # generated tasks mixed into training (off by default)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup then a schedule over exactly the run's length."""

    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # floor of cosine / end of wsd decay, as a fraction of lr
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    decay_shape: str = "linear"  # wsd cooldown: linear | 1-sqrt (Hägele et al. 2024) | cosine
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
    async_checkpoint: bool = True  # write checkpoints in a background thread (llm.checkpoint); false: the loop waits
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How one run is laid out over the devices it sees: a mesh data x fsdp x tensor x expert.

    The product of the four sizes is the device count; one of them may be -1, "the rest of
    the devices". The default is pure data parallel over every visible device. ``llm.sharding``
    says what each axis shards. The mesh is how a run executes, not what it is (EXECUTION_KEYS).
    """

    data: int = -1  # batch rows split over data; parameters replicated
    fsdp: int = 1  # batch rows, and parameters and optimiser state, split over fsdp (ZeRO-3)
    tensor: int = 1  # attention heads, MLP hidden units and vocabulary split over tensor (Megatron)
    expert: int = 1  # MoE experts split over expert (llm.moe); batch rows too, elsewhere


@dataclasses.dataclass(frozen=True)
class Config:
    """A fully resolved training run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


# --------------------------------------------------------------------------- the run config


_MLPS = ("swiglu", "gelu")
_LOGITS = ("full", "blockwise")
_SCHEDULES = ("cosine", "wsd", "constant")
_DECAY_SHAPES = ("linear", "1-sqrt", "cosine")
_TOKENIZERS = ("bytes", "bpe")
_DTYPES = ("float32", "bfloat16", "float16")


def _one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{name}={value!r} is not allowed{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}"
        )


# The allowed range of every numeric field (None, where allowed, means "off" and is
# not checked). A new numeric field needs a line here: tests/test_config.py feeds
# NaN, inf and -1 to every one. NaN fails every rule, as it fails every comparison.
RANGES: dict[str, str] = {
    "model.d_model": "> 0", "model.n_layers": "> 0", "model.n_heads": "> 0", "model.n_kv_heads": "> 0",
    "model.d_ff": "> 0", "model.vocab_size": "> 0", "model.seq_len": "> 0",
    "model.rope_theta": "> 0", "model.norm_eps": "> 0", "model.init_std": "> 0",
    "model.moe.n_experts": "> 0", "model.moe.top_k": "> 0", "model.moe.every": "> 0", "model.moe.d_ff_expert": "> 0",
    "model.moe.n_shared": ">= 0", "model.moe.capacity_factor": "> 0", "model.moe.ep_capacity_factor": "> 0",
    "model.moe.load_balance_coef": ">= 0", "model.moe.router_z_coef": ">= 0",
    "data.seed": "in [0, 2**63)", "data.dataset_tokens": "> 0", "data.eval_fraction": "in (0, 1)",
    "data.markov_alpha": "> 0", "data.markov_support": ">= 2",
    "data.tasks.fraction": "in (0, 1)", "data.tasks.seed": "in [0, 2**63)", "data.tasks.pool_tokens": "> 0",
    "optim.lr": "> 0", "optim.warmup_steps": ">= 0", "optim.min_lr_ratio": "in [0, 1]",
    "optim.decay_fraction": "in [0, 1]", "optim.weight_decay": ">= 0",
    "optim.b1": "in [0, 1)", "optim.b2": "in [0, 1)",  # Adam's moment decays: 1 never forgets the first gradient
    "optim.eps": "> 0", "optim.grad_clip": "> 0", "optim.z_loss_coef": ">= 0",
    "train.batch_size": "> 0", "train.grad_accum": "> 0", "train.steps": "> 0", "train.tokens": "> 0",
    "train.seed": "in [0, 2**63)",  # jax.random keys take a C long
    "train.eval_every": "> 0", "train.eval_tokens": "> 0", "train.log_every": "> 0",
    "train.checkpoint_every": "> 0", "train.keep_checkpoints": "> 0",
    "mesh.data": "-1 or > 0", "mesh.fsdp": "-1 or > 0", "mesh.tensor": "-1 or > 0", "mesh.expert": "-1 or > 0",
}  # fmt: skip

_RULES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 2": lambda v: v >= 2,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 2**63)": lambda v: 0 <= v < 2**63,
    "-1 or > 0": lambda v: v == -1 or v > 0,  # mesh sizes: -1 is "the rest of the devices"
}


def _field(cfg: Any, dotted: str) -> Any:
    """Value of ``model.moe.top_k`` etc.; None when a section on the way is off (model.moe: null)."""
    value = cfg
    for part in dotted.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> Config:
    """Check every numeric range, then cross-field constraints; return ``cfg`` unchanged or raise ConfigError."""
    for key, rule in RANGES.items():
        value = _field(cfg, key)
        if value is not None and not _RULES[rule](value):
            raise ConfigError(f"{key} must be {rule}, got {value}")
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for rotary positions")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    _one_of("model.mlp", m.mlp, _MLPS)
    _one_of("model.logits", m.logits, _LOGITS)
    _one_of("model.compute_dtype", m.compute_dtype, _DTYPES)
    _one_of("model.param_dtype", m.param_dtype, _DTYPES)
    if m.moe is not None:
        e = m.moe
        _one_of("model.moe.grouped_matmul", e.grouped_matmul, ("auto", "ragged_dot", "blocked"))
        if not 1 <= e.top_k <= e.n_experts:
            raise ConfigError(f"model.moe.top_k={e.top_k} must be between 1 and n_experts={e.n_experts}")
        if e.every > m.n_layers:
            raise ConfigError(f"model.moe.every={e.every} exceeds model.n_layers={m.n_layers}: no block would be MoE")
        if cfg.mesh.expert > 1 and e.n_experts % cfg.mesh.expert:
            raise ConfigError(f"model.moe.n_experts={e.n_experts} is not divisible by mesh.expert={cfg.mesh.expert}: "
                              "each expert-parallel device holds n_experts / mesh.expert experts")
        if e.capacity_factor is not None and e.ep_capacity_factor is not None:
            raise ConfigError("model.moe.ep_capacity_factor applies to dropless routing only; with "
                              f"model.moe.capacity_factor={e.capacity_factor} the per-sequence slots are exchanged "
                              "as they are: set one of them to null")
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
    if d.tasks is not None:
        _check_tasks(d.tasks, synthetic)
    _one_of("optim.schedule", o.schedule, _SCHEDULES)
    _one_of("optim.decay_shape", o.decay_shape, _DECAY_SHAPES)
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if (t.steps is None) == (t.tokens is None):
        raise ConfigError("set exactly one of train.steps and train.tokens (the other to null)")
    _check_mesh(cfg)
    return cfg


MESH_AXES = tuple(f.name for f in dataclasses.fields(MeshConfig))  # mesh axis names, in mesh order
# The mesh axes that split the batch rows (llm.sharding's rule for the logical axis "batch").
BATCH_MESH_AXES = ("data", "fsdp", "expert")


def _check_mesh(cfg: Config) -> None:
    """What can be checked without knowing the device count: one -1 at most, and (when no size
    is -1) a micro-batch that splits evenly over the batch axes. ``llm.sharding.mesh_shape``
    checks the rest against the devices."""
    sizes = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh.{rest[0]} and mesh.{rest[1]} are both -1 (the rest of the devices): "
                          "at most one mesh axis may be -1")
    if not rest:
        check_batch_split(cfg, sizes)


def check_batch_split(cfg: Config, sizes: Mapping[str, int]) -> None:
    """ConfigError unless the micro-batch (batch_size / grad_accum rows) divides evenly over the
    mesh axes that split the batch (``sizes``: mesh axis -> size, all resolved)."""
    rows = cfg.train.batch_size // cfg.train.grad_accum
    split = math.prod(sizes[axis] for axis in BATCH_MESH_AXES)
    if rows % split:
        named = " x ".join(f"mesh.{axis}={sizes[axis]}" for axis in BATCH_MESH_AXES if sizes[axis] > 1)
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {rows} sequences per micro-batch cannot be split evenly "
            f"over {named} = {split} devices: make it a multiple of {split}"
        )


def _check_tasks(mix: TaskMixConfig, synthetic: bool) -> None:
    """data.tasks: known names (each once), params only for those names, and each task buildable."""
    # lazy: only configs that mix tasks pay for the import
    from llm.tasks import TASKS, get_task

    if synthetic:
        raise ConfigError("data.tasks needs a text source (builtin:, text:, tfds:): synthetic sources emit "
                          "token ids, not text; set data.tasks=null")
    if not mix.names:
        raise ConfigError("data.tasks.names is empty: name at least one task, e.g. data.tasks.names=[facts]")
    for name in mix.names:
        if name not in TASKS:
            raise ConfigError(f"data.tasks.names: unknown task {name!r}{did_you_mean(name, list(TASKS))}; "
                              f"choose from {', '.join(TASKS)}")
        if mix.names.count(name) > 1:
            raise ConfigError(f"data.tasks.names lists {name!r} twice")
    params = mix.params or {}
    for name in params:
        if name not in mix.names:
            raise ConfigError(f"data.tasks.params.{name}: not one of data.tasks.names ({', '.join(mix.names)})")
    for name in mix.names:
        try:
            get_task(name, **params.get(name, {}))
        except ConfigError as err:
            raise ConfigError(f"data.tasks.params.{name}: {err}") from None


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Typed, validated ``Config`` from a nested mapping."""
    data = deep_copy(dict(data or {}))
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


# How a run is executed, not what it trains: the progress bar, the MoE kernel (the
# dispatch kernels compute the same function; "auto" picks one per platform), the layer
# scan (same parameters, stored stacked, converted on restore by llm.layer_stack; same
# function, one compiled unit) and the blockwise loss (same
# loss; the logit gradient rounded to the compute dtype) and the device mesh (the same
# function computed over other devices). They may differ between a run and its resume,
# and they are not part of a run's identity.
EXECUTION_KEYS = ("train.progress", "model.moe.grouped_matmul", "model.scan_layers", "model.logits") + tuple(
    f"mesh.{axis}" for axis in MESH_AXES
) + ("train.async_checkpoint",)  # the same checkpoint files, written in the background or not


def without_execution_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Copy of a nested config mapping with the EXECUTION_KEYS removed (for comparing runs)."""
    data = deep_copy(data)
    for dotted in EXECUTION_KEYS:
        *path, leaf = dotted.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


# What may differ between the members of a population (llm.population): keys that change
# neither the shapes nor the length of a run, so P runs share one compiled step. The seeds
# act on the host (parameter init, batch sampling); the optimiser keys are handed to the
# step as per-member arrays.
POPULATION_KEYS = ("train.seed", "data.seed", "optim.lr", "optim.weight_decay")


def population_signature(cfg: Config) -> str:
    """What runs must share to train as one population: the config without POPULATION_KEYS
    and EXECUTION_KEYS, as canonical YAML (equal text: same population)."""
    data = without_execution_keys(to_dict(cfg))
    for dotted in POPULATION_KEYS:
        section, leaf = dotted.split(".")
        data[section].pop(leaf, None)
    return yaml.safe_dump(data, sort_keys=True)
