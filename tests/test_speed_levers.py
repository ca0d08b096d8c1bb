"""Speed levers keep the numbers (issue 13): the layer scan and the blockwise loss against the plain path.

Each lever is an execution key (llm.config.EXECUTION_KEYS): a run keeps its identity and its
checkpoints whichever way it executes, so the optimised path must train the same model.
Tolerances: the scan runs the same operations, fused differently, so metrics agree to 1e-5
(relative) in float32 (the MoE model) and 1e-3 in bfloat16 (the dense model); in float32 the
parameters after three steps (the scan's, stored stacked, converted back per block) agree to
1e-5 absolute (not compared in bfloat16: Adam turns rounding noise in a near-zero gradient
into a full lr-sized step of either sign); the blockwise loss rounds the logit gradient to the compute dtype, so
in bfloat16 the losses of three steps agree to 1e-3 nats, in float32
(the MoE model) to 1e-5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.config import EXECUTION_KEYS, Config, ConfigError, ModelConfig, MoEConfig, TrainConfig, load_config
from llm.layer_stack import to_layout
from llm.logits import block_tokens, blockwise_logits, hidden_state_loss
from llm.model import Transformer
from llm.optim import make_optimizer
from llm.training import fetch_step_metrics, make_train_step, prefetch_to_device

# The reference's shape of block (GELU, tied embeddings) in bfloat16.
DENSE = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=64, seq_len=16,
                    compute_dtype="bfloat16", mlp="gelu", tie_embeddings=True)  # fmt: skip
# MoE every 2nd block of 5: two (dense, MoE) units scanned, one dense block left over.
MOE = dataclasses.replace(DENSE, n_layers=5, mlp="swiglu", tie_embeddings=False, compute_dtype="float32",
                          moe=MoEConfig(n_experts=4, top_k=2, every=2, d_ff_expert=32))  # fmt: skip
STEPS = 3


def train_metrics(model_cfg: ModelConfig, steps: int = STEPS, with_params: bool = False):
    """Per-step metrics of the real train step on fixed random tokens (and the final params, per block)."""
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=4, steps=steps, tokens=None))
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(cfg.optim, steps)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    step_fn = make_train_step(graphdef, optimizer, cfg)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        state, metrics = step_fn(state, rng.integers(0, model_cfg.vocab_size, (4, model_cfg.seq_len + 1), dtype=np.int32))
        out.append({k: float(v) for k, v in metrics.items()})
    return (out, to_layout(state["params"], model_cfg, stacked=False)) if with_params else out


@pytest.fixture(scope="module")
def plain_and_params():
    return {"dense": train_metrics(DENSE, with_params=True), "moe": train_metrics(MOE, with_params=True)}


@pytest.fixture(scope="module")
def plain(plain_and_params):
    return {name: metrics for name, (metrics, _) in plain_and_params.items()}


@pytest.mark.parametrize("name,cfg,rtol", [("dense", DENSE, 1e-3), ("moe", MOE, 1e-5)])
def test_layer_scan_trains_like_the_unrolled_blocks(plain_and_params, name, cfg, rtol):
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=name == "moe")
    scanned, params = train_metrics(scan_cfg, with_params=True)
    want_metrics, want_params = plain_and_params[name]
    assert [sorted(m) for m in scanned] == [sorted(m) for m in want_metrics]  # same MoE stats, per layer
    for got, want in zip(scanned, want_metrics):
        np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=rtol, atol=1e-6)
    assert jax.tree.structure(params) == jax.tree.structure(want_params)
    if cfg.compute_dtype == "float32":
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,cfg,atol", [("dense", DENSE, 1e-3), ("moe", MOE, 1e-5)])
def test_blockwise_loss_trains_like_full_logits(plain, name, cfg, atol):
    blockwise = train_metrics(dataclasses.replace(cfg, logits="blockwise"))
    np.testing.assert_allclose([m["train_loss"] for m in blockwise], [m["train_loss"] for m in plain[name]], atol=atol)
    np.testing.assert_allclose([m["grad_norm"] for m in blockwise], [m["grad_norm"] for m in plain[name]], rtol=100 * atol)


def test_blockwise_gradients_match_autodiff_of_full_logits_over_several_blocks():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x_ND = jax.random.normal(k1, (12, 8))
    w_DV = jax.random.normal(k2, (8, 20))
    t_N = jax.random.randint(k3, (12,), 0, 20)
    weights_N = jax.random.uniform(k4, (12,))

    def loss(terms):  # nll and z-loss, weighted: every cotangent path of the custom backward
        log_z, target = terms
        return jnp.sum(weights_N * (log_z - target)) + 0.1 * jnp.sum(log_z**2)

    def full(x, w):
        logits = x @ w
        return loss((jax.nn.logsumexp(logits, axis=-1), jnp.take_along_axis(logits, t_N[:, None], axis=-1)[:, 0]))

    want = jax.value_and_grad(full, argnums=(0, 1))(x_ND, w_DV)
    got = jax.value_and_grad(lambda x, w: loss(blockwise_logits(x, w, t_N, 4)), argnums=(0, 1))(x_ND, w_DV)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block=5 does not divide the 12 tokens"):
        blockwise_logits(x_ND, w_DV, t_N, 5)


def test_block_tokens_is_the_largest_divisor_under_the_byte_cap():
    assert block_tokens(16 * 1024, 50304) == 1024  # 256 MiB / (4 B x 50304) = 1334 tokens: 1024 divides
    assert block_tokens(12, 20, block_bytes=4 * 20 * 5) == 4  # cap 5 tokens; 5 does not divide 12
    assert block_tokens(100, 256) == 100  # all of it fits in one block


def test_blockwise_loss_never_holds_full_float32_logits():
    """Temporary memory of loss + gradient, from XLA's memory analysis, at vocab 50304."""
    n, d, v = 512, 32, 50304
    full_bytes = n * v * 4
    x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(kind):
        loss = lambda x, w, t: hidden_state_loss(x, w, t, kind, block=32)[0]  # noqa: E731  (16 blocks)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w, t).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") >= full_bytes
    assert temp_bytes("blockwise") < full_bytes / 4  # a block's logits and their gradient: 2/16 of full


def test_the_levers_are_execution_keys():
    assert {"model.scan_layers", "model.logits"} <= set(EXECUTION_KEYS)  # checkpoints convert (llm.layer_stack)
    with pytest.raises(ConfigError, match="model.logits='blocked' is not allowed.*blockwise"):
        load_config(overrides=["model.logits=blocked"])


def test_prefetch_yields_every_batch_in_order_on_the_device_built_only_when_asked():
    built = []

    def make(i):
        built.append(i)
        return np.full((2, 3), i, np.int32)

    batches = prefetch_to_device(make, 3, 6)
    first = next(batches)
    assert built == [3]  # batch 4 is built when the loop asks, after dispatching step 3
    rest = list(batches)
    assert [int(b[0, 0]) for b in [first, *rest]] == [3, 4, 5]
    assert all(isinstance(b, jax.Array) for b in [first, *rest])


def test_fetch_step_metrics_returns_the_first_n_of_each_call_in_order():
    calls = [({"train_loss": jnp.array([2.5, 1.5, 9.0]), "grad_norm": jnp.array([0.0, 1.0, 9.0])}, 2),
             ({"train_loss": jnp.array([0.5, 9.0, 9.0]), "grad_norm": jnp.array([2.0, 9.0, 9.0])}, 1)]  # fmt: skip
    fetched = fetch_step_metrics(calls)  # the 9s are steps a call did not run
    assert [(float(m["train_loss"]), float(m["grad_norm"])) for m in fetched] == [(2.5, 0.0), (1.5, 1.0), (0.5, 2.0)]
