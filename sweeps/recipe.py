"""The shape recipe: a model of a target parameter count, with its learning rate and batch.

One frozen ``Recipe`` holds every rule a sweep uses to turn a target size N into a
run, so a sweep is reproducible from its spec alone and each rule is overridable in
the spec's ``recipe:`` section.

Shape rule (``shape_for_params``), pure and deterministic:

* d_model runs over multiples of ``round_to`` (64 suits GPU/TPU tiles; 8 suits tiny
  CPU models). For each candidate width the depth follows the aspect ratio:
  ``n_layers = max(1, round(d_model / aspect_ratio))``, or any depth whose
  d_model/n_layers is within a factor ``aspect_tolerance`` of ``aspect_ratio`` (Kaplan et
  al. 2020 found loss nearly flat for d_model/n_layers between about 20 and 200; the
  slack makes sizes finer-grained than the width steps alone).
* ``n_heads`` is the largest divisor of d_model not above ``d_model / head_dim`` whose
  head dim is even (RoPE rotates pairs); so the head dim is ``head_dim`` whenever
  d_model is a multiple of it.
* ``d_ff = ffn_ratio * d_model`` rounded up to a multiple of ``round_to``
  (8/3 keeps a SwiGLU MLP at the parameter count of a 4x GELU MLP).
* The chosen (width, depth) is the one whose exact parameter count
  (``llm.counting.n_params``, key ``count``) is closest to the target in log space; ties
  go to the aspect ratio nearest ``aspect_ratio``, then to the smaller model.

Learning-rate rule: ``lr = lr_ref * (N / n_ref) ** -lr_exponent``, a gentle decrease
with size between Kaplan's logarithmic rule and the 1/width of muP. Batch rule:
``batch_tokens = batch_tokens_ref * (N / n_ref) ** batch_exponent``, rounded to a power
of two sequences; ``batch_tokens_ref: null`` keeps the base config's batch size. N in
both rules is the counted size (``count``) of the chosen shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llm.config import ConfigError, ModelConfig

_COUNTS = ("n_params_nonembed", "n_params_total", "n_params_active_nonembed", "n_params_active")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Rules from a target parameter count to model shape, learning rate and batch size."""

    aspect_ratio: float = 64.0  # d_model / n_layers
    aspect_tolerance: float = 1.5  # depths with d_model/n_layers within this factor are allowed
    head_dim: int = 64  # preferred d_model / n_heads
    ffn_ratio: float = 8 / 3  # d_ff / d_model before rounding (8/3 for SwiGLU, 4 for GELU)
    round_to: int = 64  # d_model and d_ff are multiples of this
    count: str = "n_params_nonembed"  # which llm.counting.n_params entry the target N means
    max_d_model: int = 16384  # search limit; a target needing more is an error
    lr_ref: float = 3e-3  # peak learning rate at N = n_ref
    n_ref: float = 1e6
    lr_exponent: float = 0.2  # lr ~ N^-lr_exponent; 0 keeps lr_ref for every size
    batch_tokens_ref: int | None = None  # tokens per step at N = n_ref; None: base batch size
    batch_exponent: float = 0.0
    min_batch_size: int = 1  # sequences
    max_batch_size: int = 4096
    warmup_fraction: float | None = None  # warmup_steps = fraction * steps (None: base config)

    def __post_init__(self) -> None:
        if self.count not in _COUNTS:
            raise ConfigError(f"recipe.count={self.count!r} must be one of {', '.join(_COUNTS)}")
        if self.aspect_tolerance < 1:
            raise ConfigError(f"recipe.aspect_tolerance must be >= 1, got {self.aspect_tolerance}")
        for name in ("aspect_ratio", "head_dim", "ffn_ratio", "round_to", "max_d_model", "lr_ref", "n_ref"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"recipe.{name} must be > 0, got {getattr(self, name)}")
        if self.round_to % 2:
            raise ConfigError(f"recipe.round_to must be even (head dims must be even), got {self.round_to}")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ConfigError("recipe.min_batch_size must be >= 1 and <= recipe.max_batch_size")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"recipe.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def n_heads_for(d_model: int, head_dim: int) -> int:
    """Largest divisor h of d_model with h <= d_model / head_dim and an even head dim (>= 1)."""
    for h in range(max(1, d_model // head_dim), 0, -1):
        if d_model % h == 0 and (d_model // h) % 2 == 0:
            return h
    raise ConfigError(f"d_model={d_model} has no even head dim; use an even recipe.round_to")


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9) * multiple)


def shape_of_width(d_model: int, recipe: Recipe) -> dict[str, int]:
    """Model dims of width ``d_model`` under the recipe: d_model, n_layers, n_heads, d_ff."""
    n_layers = max(1, int(math.floor(d_model / recipe.aspect_ratio + 0.5)))
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads_for(d_model, recipe.head_dim),
        "d_ff": _round_up(recipe.ffn_ratio * d_model, recipe.round_to),
    }


def count_params(model: ModelConfig, recipe: Recipe) -> int:
    """The recipe's notion of N for a model config (exact, from llm.counting)."""
    from llm.counting import n_params

    return int(n_params(model)[recipe.count])


def _with_shape(model: ModelConfig, shape: dict[str, int]) -> ModelConfig:
    changes: dict[str, Any] = dict(shape)
    if model.n_kv_heads is not None and shape["n_heads"] % model.n_kv_heads:
        changes["n_kv_heads"] = None  # GQA grouping that no longer divides falls back to MHA
    return dataclasses.replace(model, **changes)


def depths_for_width(d_model: int, recipe: Recipe) -> list[int]:
    """Depths allowed at width d_model: aspect ratio within ``aspect_tolerance`` of the target."""
    centre = max(1, int(math.floor(d_model / recipe.aspect_ratio + 0.5)))
    lo = max(1, int(math.ceil(d_model / (recipe.aspect_ratio * recipe.aspect_tolerance) - 1e-9)))
    hi = max(lo, int(math.floor(d_model * recipe.aspect_tolerance / recipe.aspect_ratio + 1e-9)))
    return sorted(set(range(lo, hi + 1)) | {centre})


def shape_for_params(n_target: float, model: ModelConfig, recipe: Recipe) -> dict[str, int]:
    """Dims (d_model, n_layers, n_heads, d_ff) whose counted N is closest to ``n_target``.

    ``model`` supplies everything the recipe does not set (vocab, MLP kind, MoE, ...),
    since those change the count. Raises ConfigError if the target is out of reach.
    """
    if not n_target > 0:
        raise ConfigError(f"target parameter count must be > 0, got {n_target}")
    best: tuple[tuple[float, float, int], int, dict[str, int]] | None = None
    d_model = recipe.round_to
    while d_model <= recipe.max_d_model:
        smallest = None
        for n_layers in depths_for_width(d_model, recipe):
            shape = {**shape_of_width(d_model, recipe), "n_layers": n_layers}
            n = count_params(_with_shape(model, shape), recipe)
            smallest = n if smallest is None else min(smallest, n)
            # Closest N in log space; then the aspect ratio nearest the target; then the smaller.
            key = (
                round(abs(math.log(max(n, 1) / n_target)), 9),
                round(abs(math.log(d_model / n_layers / recipe.aspect_ratio)), 9),
                n,
            )
            if best is None or key < best[0]:
                best = (key, n, shape)
        if smallest is not None and smallest > 2 * n_target:  # counts grow with width
            break
        d_model += recipe.round_to
    assert best is not None
    if best[1] < n_target / 2:
        raise ConfigError(
            f"target N={n_target:.3g} needs d_model above recipe.max_d_model={recipe.max_d_model}"
        )
    return best[2]


def model_for_params(n_target: float, model: ModelConfig, recipe: Recipe) -> ModelConfig:
    """``model`` resized by the shape rule to about ``n_target`` parameters."""
    return _with_shape(model, shape_for_params(n_target, model, recipe))


def lr_for_params(n: float, recipe: Recipe) -> float:
    """Peak learning rate for a model of counted size ``n`` (see module docstring)."""
    return float(recipe.lr_ref * (n / recipe.n_ref) ** (-recipe.lr_exponent))


def batch_size_for_params(n: float, seq_len: int, recipe: Recipe) -> int | None:
    """Sequences per step for counted size ``n``; None when the recipe keeps the base batch."""
    if recipe.batch_tokens_ref is None:
        return None
    tokens = recipe.batch_tokens_ref * (n / recipe.n_ref) ** recipe.batch_exponent
    sequences = 2 ** round(math.log2(max(tokens / seq_len, 1.0)))
    return int(min(max(sequences, recipe.min_batch_size), recipe.max_batch_size))
