"""Routed mixture-of-experts MLP (Switch / Mixtral / DeepSeek-shared style).

Router: float32 linear d_model -> n_experts, softmax, top-k. The k chosen
probabilities are renormalised to sum to 1 when top_k > 1 (Mixtral); for top_k = 1
the raw top probability is kept (Switch), since a renormalised single weight is
identically 1 and the router would get no gradient from the language-model loss.

Dispatch, same semantics wherever no token is dropped:
  * dropless (capacity_factor None): sort the token-expert assignments by expert and
    run grouped matmuls (``jax.lax.ragged_dot`` or the blocked kernel, llm.grouped;
    "auto" picks per platform, ``resolve_grouped_matmul``); nothing is ever dropped.
  * capacity (capacity_factor set): routing is done per group, and a group is one
    sequence (GShard/Switch route in groups too). Each expert takes at most
    C = min(T, ceil(capacity_factor * T * top_k / n_experts)) assignments of the T
    tokens of a sequence; first choices claim slots before second choices (GShard),
    earlier tokens before later ones. Assignments over capacity are dropped (the
    token keeps only its residual for that expert). Tokens are scattered into
    [E, C] slots per sequence (one expert-major buffer) and gathered back, so memory is
    O(batch * T * top_k * capacity_factor * d_model): linear in batch tokens (the
    former whole-batch one-hot dispatch tensors were [B*T, E, C] with C ~ B*T).
    Why per sequence rather than a fixed group size: a sequence's outputs then never
    depend on the other sequences in the batch, so batch size, gradient accumulation
    and eval micro-batching (padding rows included) do not change any result; and
    seq_len is already the natural, static group size. Within a sequence the path is
    not strictly causal (later tokens' first choices precede earlier tokens' second
    choices, as in Switch/GShard); dropless is.
Token validity (``valid_BT``, e.g. eval padding): invalid tokens claim no capacity
slot (they are never dispatched, so they cannot push real tokens out) and are left
out of every statistic and aux loss below. Dropless paths compute them (they cannot
affect other tokens there) but they are equally left out of the statistics.
n_shared always-on shared experts run densely on every token (one MLP of width
n_shared * d_ff_expert, which is exactly the sum of n_shared experts).

Auxiliary losses (float32, unweighted here; the model weights and sums them):
  * Switch load balance: n_experts * sum_e f_e * P_e with f_e the fraction of the
    S * top_k assignments routed to e and P_e the mean router probability of e
    (S = the valid tokens of the batch):
    1.0 under uniform routing, up to n_experts when routing collapses.
  * ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2.

Sharded (a mesh of more than one device set with ``jax.set_mesh``; ``context_mesh_axes``
reads it through llm.sharding's rules): the routed part runs inside ``jax.shard_map``.
Tokens are split over the batch mesh axes (data, fsdp, expert), so each shard routes its
own tokens; the experts are split over ``expert`` on their leading axis (E / n_ep per
shard), their hidden dim over ``tensor`` (partial outputs summed by a psum), and their
d_model (fsdp at rest) is gathered on entry. Statistics and aux losses are psum-reduced
over the batch axes: those of the whole batch. Without an expert axis each shard runs
the dropless kernel on its own tokens (no global sort). With one (expert parallelism),
each shard fills a send buffer with a FIXED number of slots C_ep per (source shard,
expert), [E, C_ep, d_model]; one ``all_to_all`` over ``expert`` sends each expert's rows
to the shard that holds it, which runs its experts on [E / n_ep, n_ep * C_ep, d_model],
and a second ``all_to_all`` sends the outputs back. C_ep is
  * dropless routing: C_ep = ceil(ep_capacity_factor * S_shard * top_k / n_experts),
    capped at S_shard (the tokens of the shard). ``ep_capacity_factor`` None (the
    default) means C_ep = S_shard, which no routing can overflow (top-k experts are
    distinct, so a shard sends an expert at most S_shard rows): outputs, aux losses and
    gradients are the one-device ones, at the price of buffers and expert FLOPs
    n_experts / top_k times the useful ones. With a factor, an expert's assignments past
    C_ep from one shard are dropped in the capacity queue order above (first choices
    first, then earlier tokens) and counted in ``drop_fraction``; the token keeps its
    residual and its other experts, its weights are not renormalised.
  * capacity routing: each sequence's [E, C] slots are exchanged as they are
    (C_ep = sequences per shard x C), so results equal the one-device path, drops included.
Padding tokens are never dispatched through the all-to-all (their routed output is 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llm.config import ModelConfig
from llm.grouped import GROUPED_MATMULS, block_layout, block_size, blocked_matmul
from llm.layers import MLP, activation, dtype_of, input_std, normal_param, output_std
from llm.sharding import logical_spec


def resolve_grouped_matmul(name: str, platform: str | None = None) -> str:
    """The dropless kernel that ``model.moe.grouped_matmul = name`` runs on ``platform``.

    "ragged_dot" and "blocked" are returned as given. "auto" (the default) is the
    fastest correct one we know of per platform: "ragged_dot" on TPU, whose backend has a
    native grouped matmul, and "blocked" elsewhere. On CPU XLA lowers ragged_dot to a dense
    product over all experts (n_experts / top_k times the useful FLOPs; a train step of the
    default model with 8 experts, top-2, batch 16 on 2 shared CPU cores: median 3.3 s
    ragged_dot vs 1.0 s blocked, 2.4-5x in each of 5 runs). On CUDA, jaxlib's XLA rewrites
    ragged_dot into that same dense product (newer XLA hands the forward and input-gradient
    products to a cuDNN grouped matmul, but still densifies the weight gradient), so
    "blocked" is the choice there too until benchmarks/train_throughput.py --moe on a GPU
    (benchmarks/gpu_ladder.sh) says otherwise.
    platform: "cpu" | "gpu" | "cuda" | "rocm" | "tpu"; None means ``jax.default_backend()``.
    """
    if name in GROUPED_MATMULS:
        return name
    if name != "auto":
        raise ValueError(f"grouped_matmul={name!r}; choose one of auto, {', '.join(GROUPED_MATMULS)}")
    return "ragged_dot" if (platform or jax.default_backend()) == "tpu" else "blocked"


def moe_kernel(cfg: ModelConfig, platform: str | None = None) -> str | None:
    """The grouped-matmul kernel a model built from ``cfg`` runs (for result.json).

    None where no grouped matmul runs: dense models and capacity routing (which
    multiplies fixed-size [E, C] slot buffers instead).
    """
    if cfg.moe is None or cfg.moe.capacity_factor is not None:
        return None
    return resolve_grouped_matmul(cfg.moe.grouped_matmul, platform)


def expert_capacity(capacity_factor: float | None, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert accepts: min(tokens, ceil(capacity_factor * tokens * top_k / n_experts)).

    capacity_factor None means n_tokens: no routing of n_tokens tokens can overflow it.
    """
    if capacity_factor is None:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """The mesh axes the MoE layer's shard_map splits over.

    batch: mesh axes of the token batch (data, fsdp, expert); expert: mesh axes of the
    experts' leading dim (none: no all-to-all); mlp: mesh axes of the experts' hidden dim
    (tensor), whose partial outputs are summed with a psum. Every expert axis must be a
    batch axis: each expert shard routes its own tokens.
    """

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    batch: tuple[str, ...] = ()
    expert: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()

    def size(self, names: tuple[str, ...]) -> int:
        """Devices along the named mesh axes."""
        return math.prod(self.mesh.shape[n] for n in names)


class MoE(nnx.Module):
    """``moe(x_BTD) -> (y_BTD, stats)``; stats are float32 scalars (losses, load, drops, entropy)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, grouped_matmul: str = "auto"):
        self.grouped_matmul = resolve_grouped_matmul(grouped_matmul)  # "auto" resolved for this process's backend
        m = cfg.moe
        d, e, f = cfg.d_model, m.n_experts, m.d_ff_expert or cfg.d_ff
        self.n_experts, self.top_k, self.capacity_factor = e, m.top_k, m.capacity_factor
        self.ep_capacity_factor = m.ep_capacity_factor
        self.kind, self.compute_dtype = cfg.mlp, dtype_of(cfg.compute_dtype)
        self.router_DE = normal_param(rngs, (d, e), input_std(cfg, d), "float32", ("embed", None))
        self.w_in_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype, ("expert", "embed", "mlp"))
        if cfg.mlp == "swiglu":
            self.w_gate_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype, ("expert", "embed", "mlp"))
        self.w_out_EFD = normal_param(rngs, (e, f, d), output_std(cfg, f), cfg.param_dtype, ("expert", "mlp", "embed"))
        self.shared = MLP(cfg, m.n_shared * f, rngs=rngs) if m.n_shared else None

    def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None, mesh_axes: MeshAxes | None = None):
        """Routed MLP of every token.

        Args:
          x_BTD: [batch, time, d_model] activations.
          valid_BT: optional bool or 0/1 [batch, time]; None means every token is real.
            Invalid tokens take no expert capacity and are left out of the stats.
          mesh_axes: run sharded over this mesh (module docstring); None: the mesh in
            context (``context_mesh_axes``), one device where there is none.
        Returns:
          y_BTD in compute dtype, and stats: float32 scalars (losses, load, drops, entropy).
        """
        b, t, d = x_BTD.shape
        x_BTD = x_BTD.astype(self.compute_dtype)
        valid_BT = jnp.ones((b, t), bool) if valid_BT is None else jnp.asarray(valid_BT).astype(bool)
        weights = {name: getattr(self, name)[...] for name in _WEIGHTS if hasattr(self, name)}
        mesh_axes = mesh_axes or context_mesh_axes(b, self.n_experts, self.w_in_EDF.shape[-1])
        if mesh_axes is None or mesh_axes.mesh.size == 1:
            y_BTD, sums = self._routed(x_BTD, valid_BT, weights, None)
        else:
            y_BTD, sums = self._sharded(x_BTD, valid_BT, weights, mesh_axes)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        return y_BTD.astype(self.compute_dtype), routing_stats(sums, self.top_k)

    def _sharded(self, x_BTD, valid_BT, weights, axes: MeshAxes):
        """``_routed`` inside shard_map: tokens split over axes.batch, experts over axes.expert."""
        n_batch, n_ep = axes.size(axes.batch), axes.size(axes.expert)
        if x_BTD.shape[0] % n_batch:
            raise ValueError(f"MoE batch of {x_BTD.shape[0]} sequences does not split over the "
                             f"{n_batch} shards of mesh axes {axes.batch}")
        if self.n_experts % n_ep:
            raise ValueError(f"model.moe.n_experts={self.n_experts} is not divisible by the expert mesh axis "
                             f"({' x '.join(axes.expert)} = {n_ep})")
        batch_P, expert, mlp = P(axes.batch or None), axes.expert or None, axes.mlp or None
        # the embed dim of the weights (FSDP) is gathered on entry; the gradient is reduce-scattered back
        weight_P = {"router_DE": P(), "w_in_EDF": P(expert, None, mlp), "w_gate_EDF": P(expert, None, mlp),
                    "w_out_EFD": P(expert, mlp, None)}

        def local(x_BTD, valid_BT, weights):
            y_BTD, sums = self._routed(x_BTD, valid_BT, weights, axes)
            return y_BTD, jax.tree.map(lambda v: jax.lax.psum(v, axes.batch), sums) if axes.batch else sums

        return jax.shard_map(
            local, mesh=axes.mesh, in_specs=(batch_P, batch_P, {k: weight_P[k] for k in weights}),
            out_specs=(batch_P, P()), check_vma=True,
        )(x_BTD, valid_BT, weights)

    def _routed(self, x_BTD, valid_BT, weights, axes: MeshAxes | None):
        """Route and dispatch the tokens at hand; (y_BTD float32, routing sums of these tokens).

        On a shard (axes given) the weights are the shard's: experts over axes.expert,
        hidden dim over axes.mlp.
        """
        b, t, d = x_BTD.shape
        s, e, k = b * t, self.n_experts, self.top_k
        x_SD, valid_S = x_BTD.reshape(s, d), valid_BT.reshape(s)
        logits_SE = x_SD.astype(jnp.float32) @ weights["router_DE"].astype(jnp.float32)
        probs_SE = jax.nn.softmax(logits_SE, axis=-1)
        top_p_SK, expert_SK = jax.lax.top_k(probs_SE, k)
        weight_SK = top_p_SK / jnp.sum(top_p_SK, axis=-1, keepdims=True) if k > 1 else top_p_SK
        mlp_axes = axes.mlp if axes is not None else ()
        ffn = functools.partial(_expert_ffn, self.kind, weights, self.compute_dtype, mlp_axes)
        dense = functools.partial(ffn, matmul=lambda x, w: jnp.einsum("erd,edf->erf", x, w))
        n_ep = axes.size(axes.expert) if axes is not None else 1
        if n_ep > 1:
            experts = functools.partial(_exchange, axis=axes.expert, n_shards=n_ep, experts=dense)
        else:
            experts = dense
        if self.capacity_factor is not None:  # per-sequence slots, exchanged as they are under EP
            c = expert_capacity(self.capacity_factor, t, k, e)
            y_SD, dropped = _capacity(x_SD, expert_SK, weight_SK, valid_S, e, t, c, experts)
        elif n_ep > 1:  # the shard's tokens are one group, C_ep slots per expert
            c = expert_capacity(self.ep_capacity_factor, s, k, e)
            y_SD, dropped = _capacity(x_SD, expert_SK, weight_SK, valid_S, e, s, c, experts)
        else:
            y_SD, dropped = self._dropless(x_SD, expert_SK, weight_SK, ffn), jnp.zeros((), jnp.float32)
        sums = routing_sums(logits_SE, probs_SE, expert_SK, valid_S, dropped)
        return y_SD.reshape(b, t, d), sums

    def _dropless(self, x_SD, expert_SK, weight_SK, ffn):
        s, k = expert_SK.shape
        if self.grouped_matmul == "blocked":
            block = block_size(s * k, self.n_experts)
            dest_A, expert_B, n_blocks = block_layout(expert_SK.reshape(-1), self.n_experts, block)
            x_PD = jnp.zeros((n_blocks * block, x_SD.shape[-1]), x_SD.dtype).at[dest_A].set(jnp.repeat(x_SD, k, axis=0))
            out_PD = ffn(x_PD, matmul=lambda x, w: blocked_matmul(x, w, expert_B))
            out_SKD = out_PD[dest_A].reshape(s, k, -1)
        else:
            expert_A = expert_SK.reshape(-1)  # A = S * K assignments, token-major
            order_A = jnp.argsort(expert_A, stable=True)
            x_AD = x_SD[order_A // k]  # sorted assignment -> its token
            group_sizes_E = jnp.bincount(expert_A, length=self.n_experts).astype(jnp.int32)
            out_AD = ffn(x_AD, matmul=lambda x, w: jax.lax.ragged_dot(x, w, group_sizes_E))
            out_SKD = jnp.zeros_like(out_AD).at[order_A].set(out_AD).reshape(s, k, -1)
        return jnp.einsum("skd,sk->sd", out_SKD.astype(jnp.float32), weight_SK)


_WEIGHTS = ("router_DE", "w_in_EDF", "w_gate_EDF", "w_out_EFD")


def context_mesh_axes(n_rows: int, n_experts: int, d_ff: int) -> MeshAxes | None:
    """MeshAxes of the mesh set with ``jax.set_mesh``, by llm.sharding's rules, for a batch of ``n_rows``.

    None (the one-device code, partitioned by XLA) when no mesh of more than one device is set,
    or when the batch rows cannot be split over the expert axes (the all-to-all needs each
    expert shard to hold its own tokens).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    sizes = dict(mesh.shape)

    def axes(name: str, dim: int) -> tuple[str, ...]:  # the mesh axes llm.sharding gives one dim
        entry = logical_spec((name,), sizes, (dim,))
        entry = entry[0] if len(entry) else None
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    batch, expert = axes("batch", n_rows), axes("expert", n_experts)
    if not set(expert) <= set(batch):
        return None
    return MeshAxes(mesh=mesh, batch=batch, expert=expert, mlp=axes("mlp", d_ff))


def _expert_ffn(kind, weights, cdt, mlp_axes, x, matmul):
    """Expert FFN over grouped rows; ``matmul(x, w_EAB)`` picks each row's expert.

    With the hidden dim split over ``mlp_axes`` the output matmul gives partial sums, added in float32.
    """
    h_in = matmul(x, weights["w_in_EDF"].astype(cdt))
    h_gate = matmul(x, weights["w_gate_EDF"].astype(cdt)) if kind == "swiglu" else None
    out = matmul(activation(kind, h_in, h_gate), weights["w_out_EFD"].astype(cdt))
    return jax.lax.psum(out.astype(jnp.float32), mlp_axes).astype(out.dtype) if mlp_axes else out


def _exchange(buffer_ERD, axis: tuple[str, ...], n_shards: int, experts):
    """Send each expert's rows to the shard holding it, run ``experts`` there, send the outputs back.

    buffer_ERD: [n_experts, rows, d] on every shard; expert e lives on shard e // (n_experts / n_shards).
    ``experts`` maps [n_experts / n_shards, n_shards * rows, d] (the rows of every source shard) to
    outputs of the same shape.
    """
    e, r, d = buffer_ERD.shape
    send_NLRD = buffer_ERD.reshape(n_shards, e // n_shards, r, d)  # N: destination shard, L: its local expert
    recv_NLRD = jax.lax.all_to_all(send_NLRD, axis, 0, 0, tiled=True)  # N now: source shard
    out_LND = experts(recv_NLRD.transpose(1, 0, 2, 3).reshape(e // n_shards, n_shards * r, d))
    back_NLRD = out_LND.reshape(e // n_shards, n_shards, r, -1).transpose(1, 0, 2, 3)
    return jax.lax.all_to_all(back_NLRD, axis, 0, 0, tiled=True).reshape(e, r, -1)


def _capacity(x_SD, expert_SK, weight_SK, valid_S, n_experts: int, group: int, capacity: int, experts):
    """Capacity dispatch in groups of ``group`` consecutive tokens (a sequence; under EP dropless, the shard).

    Every expert takes at most ``capacity`` assignments of a group; the slots of all groups make one
    [n_experts, groups * capacity, d] buffer (expert-major, so EP can split it by expert) that
    ``experts`` maps to outputs of the same shape.
    Returns (y_SD float32, number of valid assignments dropped as a float32 scalar).
    """
    s, k = expert_SK.shape
    e, g, d, c = n_experts, s // group, x_SD.shape[-1], capacity
    # Assignments of a group in queue order a = choice * group + position: first choices first.
    expert_GA = expert_SK.reshape(g, group, k).transpose(0, 2, 1).reshape(g, k * group)
    valid_GA = jnp.tile(valid_S.reshape(g, 1, group), (1, k, 1)).reshape(g, k * group)
    onehot_GAE = jax.nn.one_hot(expert_GA, e, dtype=jnp.int32) * valid_GA[..., None]  # padding queues nowhere
    slot_GA = jnp.sum((jnp.cumsum(onehot_GAE, axis=1) - 1) * onehot_GAE, axis=-1)
    keep_GA = valid_GA & (slot_GA < c)
    rows = e * g * c
    dest_GA = jnp.where(keep_GA, (expert_GA * g + jnp.arange(g)[:, None]) * c + slot_GA, rows)  # rows: never written
    x_AD = jnp.tile(x_SD.reshape(g, 1, group, d), (1, k, 1, 1)).reshape(g * k * group, d)
    x_RD = jnp.zeros((rows, d), x_SD.dtype).at[dest_GA.reshape(-1)].set(x_AD, mode="drop")
    out_RD = experts(x_RD.reshape(e, g * c, d)).reshape(rows, -1)
    out_GAD = out_RD[jnp.minimum(dest_GA, rows - 1)].astype(jnp.float32)
    weight_GA = weight_SK.reshape(g, group, k).transpose(0, 2, 1).reshape(g, k * group) * keep_GA
    y_SD = jnp.sum((out_GAD * weight_GA[..., None]).reshape(g, k, group, d), axis=1).reshape(s, d)
    return y_SD, jnp.sum(valid_GA & ~keep_GA).astype(jnp.float32)


def routing_sums(logits_SE, probs_SE, expert_SK, valid_S, dropped) -> dict[str, jax.Array]:
    """Sums over the valid tokens at hand from which ``routing_stats`` follows (psum-able over shards)."""
    w_S = valid_S.astype(jnp.float32)
    e, k = probs_SE.shape[-1], expert_SK.shape[-1]
    entropy_S = -jnp.sum(probs_SE * jnp.log(probs_SE + 1e-20), axis=-1)
    return {
        "tokens": jnp.sum(w_S),
        "assignments_E": jnp.bincount(expert_SK.reshape(-1), weights=jnp.repeat(w_S, k), length=e),
        "probs_E": jnp.sum(probs_SE * w_S[:, None], axis=0),
        "z_loss": jnp.sum(w_S * jnp.square(jax.nn.logsumexp(logits_SE, axis=-1))),
        "entropy": jnp.sum(w_S * entropy_S),
        "dropped": jnp.asarray(dropped, jnp.float32),
    }


def routing_stats(sums: dict[str, jax.Array], top_k: int) -> dict[str, jax.Array]:
    """Load-balance and z losses, load min/max/CV, drop fraction and router entropy from ``routing_sums``.

    Means over valid tokens (max(., 1): an all-padding batch gives zeros, not NaN); elementwise
    sums, not matmuls, so no TF32 rounding on GPUs.
    """
    n_valid = jnp.maximum(sums["tokens"], 1.0)
    load_E = sums["assignments_E"] / (n_valid * top_k)
    e = load_E.shape[0]
    return {
        "load_balance_loss": e * jnp.sum(load_E * sums["probs_E"] / n_valid),
        "router_z_loss": sums["z_loss"] / n_valid,
        "load_min": jnp.min(load_E),
        "load_max": jnp.max(load_E),
        "load_cv": jnp.std(load_E) / jnp.maximum(jnp.mean(load_E), 1e-20),
        "drop_fraction": sums["dropped"] / (n_valid * top_k),
        "router_entropy": sums["entropy"] / n_valid,
    }
