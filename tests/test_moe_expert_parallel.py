"""Expert parallelism on 8 fake CPU devices, against one device.

The MoE layer alone: outputs, aux losses and gradients under expert x tensor and data x
expert meshes, overflow of the all-to-all capacity dropped and counted. An MoE model trained
3 steps under every mesh layout of issue 14: same losses and parameters as on one device,
nothing dropped, expert weights split as the rules say, tokens exchanged by all-to-all only
with an expert axis. The device count must be fixed before JAX starts, so all of it runs in
one subprocess (this file run as a script) that prints a JSON report; the tests assert on it
and print the numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
B, T, D, E, F = 8, 4, 16, 8, 24
TOL = 2e-5  # float32, O(1) values: reduction order differs between layouts

# The layer alone (the model rows below cover the other layouts): tensor splits the experts'
# hidden dim (a psum), capacity routing exchanges its per-sequence slots.
LAYER_CASES = {("dropless", "expert 4 x tensor 2"): {"expert": 4, "tensor": 2},
               ("capacity", "data 2 x expert 4"): {"data": 2, "expert": 4}}
STEPS = 3
LOSS_TOL = 1e-5  # float32 losses of about 5.5
# Adam's normalised update turns float32 noise on near-zero gradients into steps of up to lr
# (1e-2) times its relative size: 3 steps leave differences of up to ~1e-4 in a few parameters.
PARAM_TOL = 2e-4
# name -> mesh section (8 devices each): the layouts of issue 14 for an MoE model
LAYOUTS = {
    "data 8": {"data": 8},
    "fsdp 8": {"data": 1, "fsdp": 8},
    "data 2 x fsdp 4": {"data": 2, "fsdp": 4},
    "data 4 x tensor 2": {"data": 4, "tensor": 2},
    "fsdp 4 x tensor 2": {"data": 1, "fsdp": 4, "tensor": 2},
    "expert 8": {"data": 1, "expert": 8},
    "data 2 x expert 4": {"data": 2, "expert": 4},
    "fsdp 2 x expert 4": {"data": 1, "fsdp": 2, "expert": 4},
}


# Compiling dominates at these shapes: cheaper CPU code generation halves the subprocess's CPU
# time (112 s -> 59 s) and changes no test outcome (the same differences, within 3e-5).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def report():
    """Run the checks on 8 fake devices; the subprocess's JSON report."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("routing,layout", LAYER_CASES)
def test_sharded_layer_equals_one_device(report, routing, layout):
    row = report["layer"][f"{routing} / {layout}"]
    print(layout, routing, row)
    assert row["devices"] == 8
    for what in ("y", "stats", "grads"):
        assert row[what] < TOL, (what, row)
    assert row["drop_fraction"] == report["drop_fraction_one_device"][routing]
    assert row["grad_router"] > 1e-3  # the router's gradient is compared, not vacuously zero


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_training_equals_one_device(report, layout):
    row = report["layouts"][layout]
    print(f"{layout}: max |loss diff| {row['loss_diff']:.2e}, max |param diff| {row['param_diff']:.2e}, "
          f"param bytes per device {row['param_bytes_per_device']} (one device {report['param_bytes']})")
    assert row["devices"] == 8
    assert row["loss_diff"] < LOSS_TOL and row["param_diff"] < PARAM_TOL
    assert row["drop_fraction"] == 0.0
    assert report["param_change"] > 1e-3  # the parameters compared really moved in 3 steps


def test_expert_weights_split_over_expert_and_fsdp(report):
    full, rows = report["expert_bytes"], report["layouts"]
    assert rows["data 8"]["expert_bytes_per_device"] == full
    assert rows["expert 8"]["expert_bytes_per_device"] == full // 8
    assert rows["fsdp 2 x expert 4"]["expert_bytes_per_device"] == full // 8
    assert rows["data 2 x expert 4"]["expert_bytes_per_device"] == full // 4


def test_tokens_are_exchanged_by_all_to_all_only_with_an_expert_axis(report):
    rows = report["layouts"]
    for name in LAYOUTS:  # forward: dispatch and return; backward: their transposes
        assert (rows[name]["all_to_all_ops"] >= 4) == ("expert" in name), (name, rows[name]["all_to_all_ops"])


def test_overflow_over_the_all_to_all_capacity_is_dropped_and_counted(report):
    low = report["overflow"]
    assert low["capacity"] == math.ceil(0.5 * (B * T // 8) * 2 / E)  # ceil(f * shard tokens * top_k / E) = 1
    assert low["dropped_expected"] > 0
    assert low["drop_fraction"] == pytest.approx(low["dropped_expected"] / ((B * T - 1) * 2))  # one padding token
    assert low["y_vs_hand"] < TOL  # the kept assignments only, weights not renormalised


def test_batch_that_does_not_split_over_the_shards_is_an_error(report):
    assert "does not split over the 8 shards" in report["bad_batch_error"]


# ----------------------------------------------------------------------------- subprocess


def _main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llm.config import ModelConfig, MoEConfig
    from llm.moe import MeshAxes, MoE, expert_capacity

    assert jax.device_count() == 8, jax.devices()

    def build(capacity_factor=None, ep_capacity_factor=None):
        cfg = ModelConfig(d_model=D, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=T, compute_dtype="float32",
                          moe=MoEConfig(n_experts=E, top_k=2, d_ff_expert=F, n_shared=1, capacity_factor=capacity_factor,
                                        ep_capacity_factor=ep_capacity_factor))
        moe = MoE(cfg, rngs=nnx.Rngs(0), grouped_matmul="blocked")
        graphdef, params = nnx.split(moe)
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
        # unit-variance fan-in weights: outputs O(1), so absolute tolerances mean something
        params = jax.tree.map(lambda w: jax.random.normal(next(keys), w.shape) / math.sqrt(w.shape[-2]), params)
        return graphdef, params

    x = jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)
    r = jax.random.normal(jax.random.key(3), (B, T, D), jnp.float32)
    valid = jnp.ones((B, T), bool).at[-1, -1].set(False)  # one padding token: excluded everywhere

    def step(graphdef, axes):
        def loss(p, x):
            y, stats = nnx.merge(graphdef, p)(x, valid, mesh_axes=axes)
            lm = jnp.sum(jnp.where(valid[..., None], y, 0.0) * r)
            return lm + stats["load_balance_loss"] + stats["router_z_loss"], (y, stats)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    def run(graphdef, params, axes):
        (_, (y, stats)), grads = step(graphdef, axes)(params, x)
        return np.asarray(jnp.where(valid[..., None], y, 0.0)), jax.tree.map(np.asarray, stats), jax.tree.map(np.asarray, grads)

    def diff(a, b):
        return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def mesh_axes(sizes):
        names = tuple(sizes)
        mesh = jax.make_mesh(tuple(sizes.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
        return MeshAxes(mesh=mesh, batch=tuple(a for a in ("data", "fsdp", "expert") if a in names),
                        expert=("expert",) if "expert" in names else (), mlp=("tensor",) if "tensor" in names else ())

    rep = {"layer": {}, "drop_fraction_one_device": {}}
    for (routing, name), sizes in LAYER_CASES.items():
        graphdef, params = build(capacity_factor=2.0 if routing == "capacity" else None)
        y0, s0, g0 = run(graphdef, params, None)
        rep["drop_fraction_one_device"][routing] = float(s0["drop_fraction"])
        axes = mesh_axes(sizes)
        y1, s1, g1 = run(graphdef, params, axes)
        rep["layer"][f"{routing} / {name}"] = {
            "devices": int(axes.mesh.size), "y": diff(y0, y1), "stats": diff(s0, s1), "grads": diff(g0, g1),
            "drop_fraction": float(s1["drop_fraction"]),
            "grad_router": float(np.max(np.abs(g1[0]["router_DE"]))),
        }

    axes = mesh_axes({"expert": 8})

    # overflow: the all-to-all capacity per (source shard, expert) at ep_capacity_factor 0.5; drops by hand
    capacity = expert_capacity(0.5, B * T // 8, 2, E)
    graphdef, params = build(ep_capacity_factor=0.5)
    y1, s1, _ = run(graphdef, params, axes)
    moe = nnx.merge(graphdef, params)
    x_SD = np.asarray(x).reshape(B * T, D)
    probs = np.asarray(jax.nn.softmax(x_SD @ np.asarray(moe.router_DE[...]), axis=-1))
    top_SK = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    keep_SK = np.zeros_like(top_SK, bool)
    per_shard = B * T // 8
    valid_S = np.asarray(valid).reshape(-1)
    for shard in range(8):
        used = np.zeros(E, int)
        for choice in range(2):  # queue order: first choices of the shard, then second choices
            for tok in range(shard * per_shard, (shard + 1) * per_shard):
                ex = top_SK[tok, choice]
                if valid_S[tok] and used[ex] < capacity:
                    used[ex] += 1
                    keep_SK[tok, choice] = True
    dropped = int(np.sum(valid_S[:, None] & ~keep_SK))
    # by hand: each token's kept experts with its (not renormalised) top-k weights, plus the shared expert
    w_SK = np.take_along_axis(probs, top_SK, axis=-1)
    w_SK = w_SK / w_SK.sum(-1, keepdims=True) * keep_SK
    hand = np.array(moe.shared(jnp.asarray(x_SD)))
    p = {k: np.asarray(getattr(moe, k)[...]) for k in ("w_in_EDF", "w_gate_EDF", "w_out_EFD")}
    for s_ in range(B * T):
        for j in range(2):
            ex = top_SK[s_, j]
            h = np.asarray(jax.nn.silu(x_SD[s_] @ p["w_gate_EDF"][ex])) * (x_SD[s_] @ p["w_in_EDF"][ex])
            hand[s_] += w_SK[s_, j] * (h @ p["w_out_EFD"][ex])
    hand = np.where(valid_S[:, None], hand, 0.0).reshape(B, T, D)
    rep["overflow"] = {"capacity": capacity, "dropped_expected": dropped, "drop_fraction": float(s1["drop_fraction"]),
                       "y_vs_hand": float(np.max(np.abs(y1 - hand)))}

    try:
        bad = nnx.merge(graphdef, params)(x[:4], mesh_axes=axes)
        rep["bad_batch_error"] = f"no error: {bad[0].shape}"
    except ValueError as err:
        rep["bad_batch_error"] = str(err)
    rep.update(_train_under_meshes())
    print(json.dumps(rep))


def _train_under_meshes():
    """An MoE model's losses and parameters after 3 steps under each of LAYOUTS and on one device."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llm.config import MeshConfig, load_config
    from llm.model import Transformer
    from llm.optim import make_optimizer
    from llm.sharding import batch_sharding, make_mesh, state_shardings
    from llm.training import train_step_fn

    # one MoE block and nothing else: the dense layers' rows are the dense model's equivalence test
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
        "model.compute_dtype=float32", "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.d_ff_expert=32",
        "train.batch_size=16", "train.steps=3", "optim.warmup_steps=0", "optim.lr=1e-2",
    ])  # fmt: skip
    batches = jax.random.randint(jax.random.key(5), (STEPS, cfg.train.batch_size, cfg.model.seq_len + 1), 0,
                                 cfg.model.vocab_size)
    graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
    optimizer = make_optimizer(cfg.optim, STEPS)
    step_fn = train_step_fn(graphdef, optimizer, cfg)
    init = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def train(mesh):
        state, tokens = init, batches
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, params, mesh))
            tokens = [jax.device_put(batch, batch_sharding(mesh, 2)) for batch in batches]
        step = jax.jit(step_fn).lower(state, tokens[0]).compile()  # compiled once; its program is inspected
        losses, drops = [], []
        for batch in tokens:
            state, metrics = step(state, batch)
            losses.append(float(metrics["train_loss"]))
            drops.append(max(float(v) for k, v in metrics.items() if k.endswith("drop_fraction")))
        return state, losses, max(drops), step.as_text().count(" all-to-all(")

    def device0_bytes(tree):
        return int(sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree)))

    def expert_params(p):
        return [v for path, v in jax.tree_util.tree_leaves_with_path(p) if "_EDF" in str(path) or "_EFD" in str(path)]

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    ref, ref_losses, _, _ = train(None)
    rep = {"param_bytes": int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))),
           "expert_bytes": int(sum(np.asarray(v).nbytes for v in expert_params(params))),
           "losses": ref_losses, "param_change": max_diff(ref["params"], params), "layouts": {}}
    for name, sizes in LAYOUTS.items():
        mesh = make_mesh(dataclasses.replace(cfg, mesh=MeshConfig(**sizes)))
        with jax.set_mesh(mesh):
            state, losses, drop, all_to_all = train(mesh)
        rep["layouts"][name] = {
            "devices": int(mesh.size),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "param_diff": max_diff(ref["params"], state["params"]),
            "drop_fraction": drop,
            "all_to_all_ops": all_to_all,
            "param_bytes_per_device": device0_bytes(state["params"]),
            "expert_bytes_per_device": device0_bytes(expert_params(state["params"])),
        }
    return rep


if __name__ == "__main__":
    _main()
