"""Child processes of tests/test_distributed.py: each needs its own XLA device count (or its own
jax.distributed process), which must be fixed before JAX starts, so each runs as a script.

``python tests/sharded_child.py MODE DIR MESH`` with MESH like ``fsdp=8`` or ``data=2,tensor=2``
(the run config's mesh section; the mesh spans every device of every process). Modes:

- ``save``: train 2 steps, checkpoint, then 2 more; writes DIR/reference.npz (state after step 2)
  and DIR/save.json (the losses of steps 3 and 4).
- ``restore``: restore step 2 onto LAYOUT's mesh from abstract targets (no state built first),
  train steps 3 and 4; writes DIR/restore.json (max abs differences to reference.npz, losses,
  the restored shardings).
- ``train3``: 3 steps from the initial state, checkpoint at 3 and restore it; writes
  DIR/train3.<process index>.json (losses, restored max abs difference). Under jax.distributed
  (the JAX_* variables of llm.distributed) every process runs it; the batch is placed with
  jax.make_array_from_process_local_data, each process building only its rows.

Parameters, optimiser state and batches are laid out by llm.sharding's rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
    "model.compute_dtype=float32", "train.batch_size=8", "train.steps=4",
    "optim.warmup_steps=1", "optim.lr=1e-2",
]  # fmt: skip


def batch(step: int, cfg):
    import numpy as np

    rng = np.random.default_rng(1000 + step)  # batch i is a pure function of i
    return rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32)


def main(mode: str, out: Path, layout_text: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llm import distributed, sharding
    from llm.checkpoint import Checkpoints
    from llm.config import load_config
    from llm.model import Transformer
    from llm.optim import make_optimizer
    from llm.training import make_train_step

    process = distributed.initialize(cluster=False)
    mesh_overrides = [f"mesh.{part}" for part in layout_text.split(",")]
    if "data" not in layout_text:
        mesh_overrides.append("mesh.data=1")
    cfg = load_config(None, CONFIG + mesh_overrides)
    mesh = sharding.make_mesh(cfg)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)

    def init():
        params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))[1]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, abstract_params, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(graphdef, optimizer, cfg)

    def place(tokens):
        rows = sharding.process_rows(batch_sharding, tokens.shape)
        return sharding.place_batch(tokens[rows], batch_sharding, tokens.shape)

    def run(state, steps):
        losses = []
        for i in steps:
            with jax.set_mesh(mesh):
                state, metrics = step_fn(state, place(batch(i, cfg)))
            losses.append(float(metrics["train_loss"]))
        return state, losses

    def flat(state):  # every leaf whole, assembled on the host (one process: every shard is here)
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}

    def local(state):  # this process's shards of every leaf, by position (nothing compiled, no collective)
        return {f"{jax.tree_util.keystr(k)}{shard.index}": np.asarray(shard.data)
                for k, v in jax.tree_util.tree_leaves_with_path(state) for shard in v.addressable_shards}

    def specs(state):
        return {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in jax.tree_util.tree_leaves_with_path(state)}

    def diff(a, b, part):
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k.startswith(part))

    def write(name, record):
        if process == 0 or name.startswith("train3"):
            (out / name).write_text(json.dumps(record))

    if mode in ("save", "train3"):
        state = jax.jit(init, out_shardings=shardings)()
        before = local(state)
        k = 2 if mode == "save" else 3
        state, losses = run(state, range(k))
        with Checkpoints(out / "checkpoints", keep=2) as checkpoints:
            checkpoints.save(k, state, {"step": k})
        saved = local(state)
        if mode == "save":
            np.savez(out / "reference.npz", **flat(state))
            _, later = run(state, range(k, k + 2))
            write("save.json", {"losses": losses + later, "n_devices": jax.device_count(), "specs": specs(state)})
            return
        targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        with Checkpoints(out / "checkpoints", keep=2) as checkpoints:
            restored, _ = checkpoints.restore(k, targets)
        back = local(restored)
        write(f"train3.{process}.json", {
            "losses": losses, "restored_max_abs_diff": max(diff(saved, back, ""), 0.0),
            "params_changed": diff(before, saved, "['params']"),
            "n_devices": jax.device_count(), "n_local_devices": jax.local_device_count(),
            "process_count": jax.process_count(), "checkpoint_steps": sorted(p.name for p in (out / "checkpoints").iterdir()),
        })  # fmt: skip
        return
    # restore: targets from the current mesh, nothing built first
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    with Checkpoints(out / "checkpoints", keep=2) as checkpoints:
        state, meta = checkpoints.restore(2, targets)
    reference = dict(np.load(out / "reference.npz"))
    got = flat(state)
    layout = specs(state)
    step = int(state["step"])
    _, losses = run(state, range(2, 4))  # donates state
    write("restore.json", {
        "params": diff(reference, got, "['params']"),
        "moments": diff(reference, got, "['opt_state']"),
        "keys_equal": sorted(reference) == sorted(got),
        "mu_keys": sum(".mu" in k or ".nu" in k for k in got),
        "step": step, "meta_step": meta["step"], "losses": losses,
        "n_devices": jax.device_count(), "specs": layout,
    })  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
