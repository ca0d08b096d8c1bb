"""Equivalence of one run over many (fake CPU) devices: a script, run in its own process.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the tests
(tests/test_mesh.py) launch this file as a subprocess; it trains each case for STEPS steps
under each of its mesh layouts, with the same seed and batches, through the functions
``llm.training.train`` uses (``init_state``, ``make_run_step``, ``Layout.put``), and prints
one JSON object:

  {case: {layout: {"losses": [...], "max_loss_diff": ..., "max_param_diff": ..., "mesh": {...},
                   "param_bytes_per_device": ..., "opt_bytes_per_device": ..., "specs": {path: [...]}}}}

Differences are against a one-device run (layout "1") of the case's reference. A case is a list
of config overrides, the layouts it runs (LAYOUTS by name) and its reference case (CASES); add a
case with its layouts to cover another model (e.g. MoE with expert layouts).

  python tests/mesh_equivalence.py [--devices 8] [--cases dense,dense_scan,moe_all]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STEPS = 3

# A tiny float32 model (float32 compute: the tolerance is float32's, not bfloat16's): 4 heads
# over 2 kv heads and d_ff=64 split over tensor=2, batch 16 over 8 devices, two micro-batches.
_TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "model.seq_len=16", "model.compute_dtype=float32", "train.batch_size=16", "train.grad_accum=2",
         "train.steps=3", "optim.warmup_steps=1", "data.source=synthetic:markov"]  # fmt: skip

_MOE = _TINY + ["model.n_layers=1", "train.grad_accum=1", "model.moe.n_experts=8", "model.moe.top_k=2",
                "model.moe.d_ff_expert=32"]  # fmt: skip

# name -> (config overrides, layouts, the case whose one-device run is the reference). The scan
# case computes the same function as the dense one (model.scan_layers), so it is compared with
# the plain path's one-device run.
CASES: dict[str, tuple[list[str], list[str], str]] = {
    "dense": (_TINY, ["1", "data8", "fsdp8", "data2_fsdp4", "data4_tensor2", "fsdp4_tensor2"], "dense"),
    "dense_scan": (_TINY + ["model.scan_layers=true"], ["fsdp4_tensor2"], "dense"),
    # one MoE block (8 experts, top-2, dropless: the expert-parallel all-to-all's default capacity
    # drops nothing; the dense case covers the other blocks) under each mesh axis at least once
    # beside the expert layouts (data, fsdp and tensor alone are the dense case's; `--cases moe_all`
    # runs every layout, 4 more compiles than CI needs)
    "moe": (_MOE, ["1", "fsdp4_tensor2", "expert8", "data2_expert4", "fsdp2_expert4"], "moe"),
    "moe_all": (_MOE, ["data8", "fsdp8", "data2_fsdp4", "data4_tensor2", "fsdp4_tensor2", "expert8", "data2_expert4",
                       "fsdp2_expert4"], "moe"),
}

# Mesh layouts by name: mesh.* sizes (absent: 1). "1" is the one-device reference.
LAYOUTS: dict[str, dict[str, int]] = {
    "1": {},
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
    "data4_tensor2": {"data": 4, "tensor": 2},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
    "expert8": {"expert": 8},
    "data2_expert4": {"data": 2, "expert": 4},
    "fsdp2_expert4": {"fsdp": 2, "expert": 4},
}


def run_layout(overrides: list[str], layout: dict[str, int]) -> dict:
    """Train STEPS steps of the config under ``layout``; losses, final state on the host, bytes, specs."""
    import jax
    import numpy as np

    from llm import sharding
    from llm.config import MESH_AXES, load_config, total_steps
    from llm.layer_stack import to_layout
    from llm.optim import make_optimizer
    from llm.training import init_state, make_run_step

    sizes = {axis: layout.get(axis, 1) for axis in MESH_AXES}
    cfg = load_config(None, overrides + [f"mesh.{axis}={size}" for axis, size in sizes.items()])
    n = int(np.prod(list(sizes.values())))
    mesh = sharding.make_mesh(cfg, jax.devices()[:n])
    steps = total_steps(cfg)
    graphdef, state, layout_ = init_state(cfg, make_optimizer(cfg.optim, steps), mesh)
    step, _ = make_run_step(graphdef, cfg, steps, layout_)
    rng = np.random.default_rng(0)
    batch_shape = (cfg.train.batch_size, cfg.model.seq_len + 1)
    losses, dropped = [], 0.0
    for _ in range(STEPS):
        tokens = rng.integers(0, cfg.model.vocab_size, batch_shape, dtype=np.int32)
        state, metrics = step(state, layout_.put(tokens[layout_.host_rows(batch_shape[0])], batch_shape[0]))
        losses.append(float(metrics["train_loss"]))
        dropped = max([dropped] + [float(v) for k, v in metrics.items() if k.endswith("drop_fraction")])
    specs = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):  # the scan's stored stacked
        spec = leaf.sharding.spec
        specs[jax.tree_util.keystr(path)] = [list(p) if isinstance(p, tuple) else p for p in spec] + [None] * (leaf.ndim - len(spec))
    return {
        "mesh": sharding.mesh_summary(mesh),
        "losses": losses,
        "drop_fraction": dropped,  # the most any MoE layer dropped in any step (0.0 for a dense model)
        # per block whatever the layout, so the scan's compare with the plain path's, leaf by leaf
        "params": [np.asarray(x) for x in jax.tree.leaves(to_layout(state["params"], cfg.model, stacked=False))],
        "param_bytes_per_device": _bytes_per_device(state["params"]),
        "opt_bytes_per_device": _bytes_per_device(state["opt_state"]),
        "specs": specs,
    }


def _bytes_per_device(tree) -> int:
    """The most bytes of ``tree``'s arrays any one device holds."""
    import jax

    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def run_cases(names: list[str]) -> dict:
    """Every layout of each case in ``names``, compared with its reference case's one-device run."""
    import numpy as np

    out: dict = {}
    references: dict = {}  # case -> (losses, params) of its one-device run
    for name in names:
        overrides, layouts, reference = CASES[name]
        if reference not in references:
            got = run_layout(CASES[reference][0], LAYOUTS["1"])
            references[reference] = got["losses"], got.pop("params")
            if reference == name:
                out.setdefault(name, {})["1"] = {**got, "max_loss_diff": 0.0, "max_param_diff": 0.0}
        ref_losses, ref_params = references[reference]
        for layout in layouts:
            if layout == "1" and reference == name:
                continue
            got = run_layout(overrides, LAYOUTS[layout])
            params = got.pop("params")
            got["max_loss_diff"] = max(abs(a - b) for a, b in zip(got["losses"], ref_losses))
            got["max_param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params))
            out.setdefault(name, {})[layout] = got
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--cases", default="dense,dense_scan,moe", help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("mesh_equivalence: JAX already started; run this file as its own process")
    # Fake CPU devices; XLA's backend optimisations off (every layout alike): compiling is most of the time.
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
                               " --xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(json.dumps(run_cases(args.cases.split(","))))


if __name__ == "__main__":
    main()
