"""MoE layer: both dispatch paths against a naive per-token, per-expert loop; losses; counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm.config import ModelConfig, MoEConfig
from llm.layers import MLP
from llm.model import Transformer
from llm.grouped import block_layout, block_size
from llm.moe import MoE, expert_capacity

B, T, D, E = 2, 6, 16, 4
S = B * T


def _cfg(mlp="swiglu", top_k=2, n_experts=E, n_shared=1, capacity_factor=None, d_ff_expert=24):
    return ModelConfig(
        d_model=D, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=T, mlp=mlp,
        compute_dtype="float32",
        moe=MoEConfig(n_experts=n_experts, top_k=top_k, d_ff_expert=d_ff_expert, n_shared=n_shared,
                      capacity_factor=capacity_factor),
    )


def _moe(cfg, seed=0, grouped_matmul="ragged_dot"):
    """MoE layer with O(1)-scale weights (unit-variance fan-in init) so errors are meaningful."""
    moe = MoE(cfg, rngs=nnx.Rngs(seed), grouped_matmul=grouped_matmul)
    graphdef, params = nnx.split(moe)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda w: jax.random.normal(next(keys), w.shape) / math.sqrt(w.shape[-2]), params)
    return nnx.merge(graphdef, params)


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _routing(moe, x_BTD):
    """Concrete top-k expert ids [S, K] (numpy), as the router picks them."""
    probs_SE = jax.nn.softmax(x_BTD.reshape(S, D) @ moe.router_DE[...], axis=-1)
    return np.asarray(jax.lax.top_k(probs_SE, moe.top_k)[1])


def _naive(moe, x_BTD, expert_SK, keep_SK=None):
    """Per token (vmapped), per chosen expert (loop): routing ids fixed, weights differentiable."""
    x_SD = x_BTD.reshape(S, D)
    probs_SE = jax.nn.softmax(x_SD @ moe.router_DE[...], axis=-1)
    keep_SK = np.ones(expert_SK.shape, bool) if keep_SK is None else keep_SK

    def one_token(x_D, probs_E, experts_K, keep_K):
        p_K = probs_E[experts_K]
        w_K = p_K / jnp.sum(p_K) if len(p_K) > 1 else p_K
        y_D = jnp.zeros((D,), jnp.float32)
        for j in range(len(p_K)):
            e = experts_K[j]
            h_F = x_D @ moe.w_in_EDF[...][e]
            if moe.kind == "swiglu":
                h_F = jax.nn.silu(x_D @ moe.w_gate_EDF[...][e]) * h_F
            else:
                h_F = jax.nn.gelu(h_F)
            y_D = y_D + jnp.where(keep_K[j], w_K[j], 0.0) * (h_F @ moe.w_out_EFD[...][e])
        if moe.shared is not None:
            y_D = y_D + moe.shared(x_D[None])[0]
        return y_D

    y_SD = jax.vmap(one_token)(x_SD, probs_SE, jnp.asarray(expert_SK), jnp.asarray(keep_SK))
    return y_SD.reshape(B, T, D)


def _value_and_grads(moe, fn, x_BTD):
    """Forward output and gradients (params and input) of sum(y * r) for a fixed random r."""
    graphdef, params = nnx.split(moe)
    r_BTD = jax.random.normal(jax.random.key(7), x_BTD.shape)

    def loss(p, x):
        y = fn(nnx.merge(graphdef, p), x)
        return jnp.sum(y * r_BTD), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x_BTD)
    return y, grads


def _max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mlp,top_k,capacity_factor,grouped", [
    ("swiglu", 2, None, "ragged_dot"), ("swiglu", 2, 2.0, None), ("swiglu", 2, None, "blocked"),
    ("gelu", 1, None, "ragged_dot"), ("gelu", 1, 4.0, None), ("gelu", 1, None, "blocked"),
])
def test_dispatch_equals_naive_loop_forward_and_grad(mlp, top_k, capacity_factor, grouped):
    # capacity_factor = n_experts / top_k gives capacity S: nothing can be dropped.
    moe = _moe(_cfg(mlp=mlp, top_k=top_k, capacity_factor=capacity_factor), grouped_matmul=grouped or "ragged_dot")
    x = _x()
    expert_SK = _routing(moe, x)
    y, g = _value_and_grads(moe, lambda m, x: m(x)[0], x)
    y_ref, g_ref = _value_and_grads(moe, lambda m, x: _naive(m, x, expert_SK), x)
    fwd_err, grad_err = _max_abs_diff(y, y_ref), _max_abs_diff(g, g_ref)
    scale = max(float(jnp.max(jnp.abs(y_ref))), max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_ref)))
    print(f"{mlp} top{top_k} cf={capacity_factor} {grouped}: max|fwd diff|={fwd_err:.2e} "
          f"max|grad diff|={grad_err:.2e} (largest |value| {scale:.1f})")
    assert fwd_err < 1e-5 and grad_err < 1e-4
    assert float(jnp.max(jnp.abs(g[0]["router_DE"][...]))) > 1e-3  # routing weights get LM gradient


def test_block_layout_by_hand():
    # Experts of 7 assignments, blocks of 2: expert 0 has 3 rows (2 blocks), 1 none, 2 has 4 (2 blocks).
    dest_A, expert_B, n_blocks = block_layout(jnp.array([2, 0, 2, 0, 2, 0, 2]), 3, 2)
    assert n_blocks == -(-(7 + 3 * 1) // 2) == 5
    assert dest_A.tolist() == [4, 0, 5, 1, 6, 2, 7]
    assert expert_B.tolist() == [0, 0, 2, 2, 2]  # last block unused (rows 8-9), clipped to expert 2
    assert block_size(24, 4) == 8 and block_size(65536, 8) == 2048 and block_size(4096, 8) == 128


def test_single_expert_dropless_equals_dense_mlp():
    cfg = _cfg(top_k=1, n_experts=1, n_shared=0, d_ff_expert=32)
    moe = _moe(cfg)
    mlp = MLP(cfg, 32, rngs=nnx.Rngs(5))
    mlp.w_in_DF[...] = moe.w_in_EDF[...][0]
    mlp.w_gate_DF[...] = moe.w_gate_EDF[...][0]
    mlp.w_out_FD[...] = moe.w_out_EFD[...][0]
    x = _x()
    y, stats = nnx.jit(lambda m, x: m(x))(moe, x)
    np.testing.assert_allclose(y, mlp(x), atol=1e-5)
    assert float(stats["load_balance_loss"]) == pytest.approx(1.0)


def test_capacity_large_drops_nothing_and_matches_dropless():
    x = _x()
    forward = nnx.jit(lambda m, x: m(x))
    y_cap, stats = forward(_moe(_cfg(capacity_factor=10.0)), x)
    y_free, free_stats = forward(_moe(_cfg()), x)
    assert float(stats["drop_fraction"]) == 0.0 and float(free_stats["drop_fraction"]) == 0.0
    np.testing.assert_allclose(y_cap, y_free, atol=1e-5)


def _hand_keep(expert_SK, capacity, valid_S=None):
    """Hand count per sequence (the routing group): first choices of all its tokens claim
    slots before second choices, earlier tokens first; invalid tokens claim nothing."""
    valid_S = np.ones(S, bool) if valid_S is None else valid_S
    keep_SK = np.zeros(expert_SK.shape, bool)
    for row in range(B):
        used = [0] * E
        for j in range(expert_SK.shape[1]):
            for s in range(row * T, (row + 1) * T):
                e = expert_SK[s, j]
                if valid_S[s]:
                    keep_SK[s, j] = used[e] < capacity
                    used[e] += 1
    return keep_SK


def test_capacity_tiny_drops_match_hand_count():
    moe = _moe(_cfg(capacity_factor=0.5))
    x = _x()
    capacity = expert_capacity(0.5, T, 2, E)  # per sequence of T tokens
    assert capacity == math.ceil(0.5 * T * 2 / E) == 2
    expert_SK = _routing(moe, x)
    keep_SK = _hand_keep(expert_SK, capacity)
    dropped = 1.0 - keep_SK.sum() / keep_SK.size
    assert dropped > 0.3  # at most E * capacity = 8 of a sequence's 12 assignments fit
    y, stats = moe(x)
    assert float(stats["drop_fraction"]) == pytest.approx(dropped)
    np.testing.assert_allclose(y, _naive(moe, x, expert_SK, keep_SK), atol=1e-5)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation (sub-jaxprs included) produces."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            sub = getattr(p, "jaxpr", None)
            if sub is not None:
                best = max(best, _largest_intermediate(getattr(sub, "jaxpr", sub)))
    return best


def test_capacity_memory_is_linear_in_batch_tokens():
    # Whole-batch routing built [B*T, E, C] dispatch tensors with C ~ B*T: 4x per doubling.
    moe = _moe(_cfg(capacity_factor=1.25))
    graphdef, params = nnx.split(moe)

    def largest(batch):
        x = jnp.zeros((batch, T, D))
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)[0])
        return _largest_intermediate(jax.make_jaxpr(jax.value_and_grad(loss))(params, x).jaxpr)

    sizes = [largest(b) for b in (8, 16, 32)]
    print(f"largest intermediate (elements) at batch 8, 16, 32: {sizes}")
    assert sizes[1] <= 2 * sizes[0] and sizes[2] <= 2 * sizes[1]


def test_capacity_padding_claims_no_slots():
    # Padding at the start of each sequence would queue ahead of the real tokens.
    moe = _moe(_cfg(capacity_factor=0.5))
    x = _x()
    valid_S = (np.arange(S) % T) >= 2
    expert_SK = _routing(moe, x)
    capacity = expert_capacity(0.5, T, 2, E)
    keep_SK = _hand_keep(expert_SK, capacity, valid_S)
    assert (keep_SK != _hand_keep(expert_SK, capacity))[valid_S].any()  # ignoring the mask drops other tokens
    y, stats = moe(x, jnp.asarray(valid_S.reshape(B, T)))
    y_ref = _naive(moe, x, expert_SK, keep_SK)
    valid_BT = valid_S.reshape(B, T)
    np.testing.assert_allclose(np.asarray(y)[valid_BT], np.asarray(y_ref)[valid_BT], atol=1e-5)
    real = keep_SK[valid_S]
    assert float(stats["drop_fraction"]) == pytest.approx(1.0 - real.sum() / real.size)


@pytest.mark.parametrize("capacity_factor", [0.5, None])
def test_padding_rows_and_tail_change_nothing_for_real_tokens(capacity_factor):
    """A batch [real row, padding row], real row right-padded, gives the real tokens' outputs
    and the MoE statistics of the real tokens alone."""
    cfg = _cfg(capacity_factor=capacity_factor)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    real_1T = jax.random.randint(jax.random.key(4), (1, T), 0, cfg.vocab_size)
    n_real = T - 2
    padded_BT = jnp.concatenate([real_1T.at[:, n_real:].set(7), jnp.full((1, T), 7)], axis=0)
    valid_BT = jnp.stack([jnp.arange(T) < n_real, jnp.zeros(T, bool)])
    forward = nnx.jit(lambda m, tok, valid: m(tok, valid))
    logits, aux = forward(model, padded_BT, valid_BT)
    # Reference: the real tokens alone, each a full sequence whose extra positions are masked
    # out by causality (outputs at positions < n_real never see later ones) and by the mask.
    ref_logits, ref_aux = forward(model, real_1T[:, :n_real], jnp.ones((1, n_real), bool))
    if capacity_factor is not None:
        # Capacity depends on the group size (T): compare against the same length, padded tail masked.
        ref_logits, ref_aux = forward(model, real_1T.at[:, n_real:].set(7), valid_BT[:1])
    np.testing.assert_allclose(logits[0, :n_real], ref_logits[0, :n_real], atol=1e-5)
    for name, value in ref_aux["metrics"].items():
        assert float(aux["metrics"][name]) == pytest.approx(float(value), abs=1e-6), name
    assert float(aux["aux_loss"]) == pytest.approx(float(ref_aux["aux_loss"]), abs=1e-6)


def _hard_router_moe(top_k):
    """Router that sends a token whose input is one-hot at j (j < E) to expert j."""
    moe = _moe(_cfg(top_k=top_k, n_shared=0))
    moe.router_DE[...] = jnp.eye(D, E)
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balance_loss_uniform_and_collapsed(top_k):
    moe = _hard_router_moe(top_k)
    # Token s prefers expert s % E (logit 10), then (s + 1) % E (logit 5): every expert
    # gets the same share of first and of second choices, and by symmetry P_e = 1/E.
    first, second = jnp.arange(S) % E, (jnp.arange(S) + 1) % E
    balanced_BTD = (10 * jax.nn.one_hot(first, D) + 5 * jax.nn.one_hot(second, D)).reshape(B, T, D)
    collapsed_BTD = (10 * jax.nn.one_hot(jnp.zeros(S, jnp.int32), D) + 5 * jax.nn.one_hot(jnp.ones(S, jnp.int32), D)).reshape(B, T, D)
    _, balanced = moe(balanced_BTD)
    _, collapsed = moe(collapsed_BTD)
    assert float(balanced["load_balance_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert float(balanced["load_cv"]) == pytest.approx(0.0, abs=1e-6)
    assert float(balanced["load_min"]) == pytest.approx(1 / E)
    # Collapse: expert 0 takes every first choice (expert 1 every second) and most of the mass.
    p0 = float(jax.nn.softmax(jnp.array([10.0, 5.0, 0, 0]))[0])
    f0 = 1.0 / top_k
    assert float(collapsed["load_balance_loss"]) > 1.5
    assert float(collapsed["load_max"]) == pytest.approx(f0)
    if top_k == 1:
        assert float(collapsed["load_balance_loss"]) == pytest.approx(E * p0, rel=1e-5)
    # Uniform router (zero logits): P_e = 1/E, so the loss is exactly 1 whatever f is.
    moe.router_DE[...] = jnp.zeros((D, E))
    _, uniform = moe(_x())
    assert float(uniform["load_balance_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert float(uniform["router_entropy"]) == pytest.approx(math.log(E), rel=1e-5)
    assert float(uniform["router_z_loss"]) == pytest.approx(math.log(E) ** 2, rel=1e-5)


def test_aux_loss_gradient_reaches_router():
    moe = _moe(_cfg(top_k=2, capacity_factor=1.0))
    graphdef, params = nnx.split(moe)

    def aux(p, which):
        return nnx.merge(graphdef, p)(_x())[1][which]

    for which in ("load_balance_loss", "router_z_loss"):
        grads = jax.jit(jax.grad(aux), static_argnums=1)(params, which)
        assert float(jnp.max(jnp.abs(grads["router_DE"][...]))) > 1e-4, which
        # Aux losses depend on the router only: expert weights get no gradient from them.
        assert float(jnp.max(jnp.abs(grads["w_in_EDF"][...]))) == 0.0


def test_short_moe_training_run_balances_and_learns():
    """Tiny Switch-style model on a deterministic next-token rule.

    Loss falls, no expert is left without load, aux losses are finite, aux_loss is the
    coefficient-weighted sum, and the router gets gradient. Block 1 is MoE (every=2).
    """
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=32, seq_len=16, compute_dtype="float32",
        moe=MoEConfig(n_experts=4, top_k=1, every=2, d_ff_expert=32, load_balance_coef=0.05, router_z_coef=0.001),
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        start_B1 = jax.random.randint(key, (8, 1), 0, 32)
        seq_BT = (start_B1 * 5 ** jnp.arange(17)[None, :] + jnp.arange(17)[None, :]) % 32

        def loss(p):
            logits, aux = nnx.merge(graphdef, p)(seq_BT[:, :-1])
            nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), seq_BT[:, 1:, None], -1))
            return nll + aux["aux_loss"], (nll, aux)

        (_, (nll, aux)), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, new_opt_state = opt.update(g, opt_state, params)
        router_grad = jnp.max(jnp.abs(g["blocks"][1]["mlp"]["router_DE"][...]))
        return optax.apply_updates(params, updates), new_opt_state, nll, aux, router_grad

    losses = []
    for i in range(80):
        params, opt_state, nll, aux, router_grad = step(params, opt_state, jax.random.key(i))
        losses.append(float(nll))
        assert float(router_grad) > 0
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    metrics = aux["metrics"]
    assert sorted(k for k in metrics if k.startswith("moe/layer")) == [
        f"moe/layer1/{n}" for n in ("drop_fraction", "load_cv", "load_max", "load_min", "router_entropy")
    ]
    for name, value in metrics.items():
        assert np.isfinite(float(value)), name
    expected = 0.05 * metrics["moe/load_balance_loss"] + 0.001 * metrics["moe/router_z_loss"]
    assert float(aux["aux_loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["moe/layer1/load_min"]) > 0.0
    print(f"final loss {losses[-1]:.3f} (first {losses[0]:.3f}); layer1 load min/max "
          f"{float(metrics['moe/layer1/load_min']):.3f}/{float(metrics['moe/layer1/load_max']):.3f}")
