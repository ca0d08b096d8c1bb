"""Child processes of tests/test_distributed.py: each needs its own XLA device count (or its own
jax.distributed process), which must be fixed before JAX starts, so each runs as a script.

``python tests/sharded_child.py MODE DIR LAYOUT`` with LAYOUT like ``fsdp=8`` or ``data=2,tensor=2``
(a mesh over the first prod(sizes) devices). Modes:

- ``save``: train 2 steps, checkpoint, then 2 more; writes DIR/reference.npz (state after step 2)
  and DIR/save.json (the losses of steps 3 and 4).
- ``restore``: restore step 2 onto LAYOUT's mesh from abstract targets (no state built first),
  train steps 3 and 4; writes DIR/restore.json (max abs differences to reference.npz, losses,
  the restored shardings).
- ``train3``: 3 steps from the initial state, checkpoint at 3 and restore it; writes
  DIR/train3.<process index>.json (losses, restored max abs difference). Under jax.distributed
  (the JAX_* variables of llm.distributed) every process runs it; the batch is placed with
  jax.make_array_from_process_local_data, each process building only its rows.

The state is sharded by hand here: fsdp shards each leaf's first dimension divisible by the fsdp
size, tensor its last dimension divisible by the tensor size, and the batch is split over
data x fsdp.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

CONFIG = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
    "model.compute_dtype=float32", "train.batch_size=8", "train.steps=4",
    "optim.warmup_steps=1", "optim.lr=1e-2",
]  # fmt: skip


def parse_layout(text: str) -> dict[str, int]:
    return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}


def spec_for(shape, layout, P):
    dims = [None] * len(shape)
    if layout.get("fsdp", 1) > 1:
        for i, n in enumerate(shape):
            if n % layout["fsdp"] == 0:
                dims[i] = "fsdp"
                break
    if layout.get("tensor", 1) > 1:
        for i in reversed(range(len(shape))):
            if dims[i] is None and shape[i] % layout["tensor"] == 0:
                dims[i] = "tensor"
                break
    return P(*dims)


def batch(step: int, cfg):
    import numpy as np

    rng = np.random.default_rng(1000 + step)  # batch i is a pure function of i
    return rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32)


def main(mode: str, out: Path, layout_text: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llm import distributed
    from llm.checkpoint import Checkpoints
    from llm.config import load_config
    from llm.model import Transformer
    from llm.optim import make_optimizer
    from llm.training import make_train_step

    process = distributed.initialize(cluster=False)
    layout = parse_layout(layout_text)
    n = math.prod(layout.values())
    auto = (jax.sharding.AxisType.Auto,) * len(layout)
    mesh = jax.make_mesh(tuple(layout.values()), tuple(layout), axis_types=auto, devices=jax.devices()[:n])
    cfg = load_config(None, CONFIG)

    def init():
        params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))[1]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    graphdef = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))[0]
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec_for(x.shape, layout, P)), abstract)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in layout)
    batch_sharding = NamedSharding(mesh, P(batch_axes or None))
    step_fn = make_train_step(graphdef, optimizer, cfg)

    def place(tokens):
        rows = batch_sharding.addressable_devices_indices_map(tokens.shape)
        first = min(idx[0].start or 0 for idx in rows.values())
        last = max(idx[0].stop or tokens.shape[0] for idx in rows.values())
        return jax.make_array_from_process_local_data(batch_sharding, tokens[first:last], tokens.shape)

    def run(state, steps):
        losses = []
        for i in steps:
            state, metrics = step_fn(state, place(batch(i, cfg)))
            losses.append(float(metrics["train_loss"]))
        return state, losses

    def flat(state):
        gathered = jax.jit(lambda s: s, out_shardings=NamedSharding(mesh, P()))(state)  # a collective: all enter
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(gathered)}

    def diff(a, b, part):
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k.startswith(part))

    def write(name, record):
        if process == 0 or name.startswith("train3"):
            (out / name).write_text(json.dumps(record))

    if mode in ("save", "train3"):
        state = jax.jit(init, out_shardings=shardings)()
        before = flat(state)
        k = 2 if mode == "save" else 3
        state, losses = run(state, range(k))
        with Checkpoints(out / "checkpoints", keep=2) as checkpoints:
            checkpoints.save(k, state, {"step": k})
        saved = flat(state)
        if mode == "save":
            if process == 0:
                np.savez(out / "reference.npz", **saved)
            _, later = run(state, range(k, k + 2))
            write("save.json", {"losses": losses + later, "n_devices": jax.device_count()})
            return
        targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        with Checkpoints(out / "checkpoints", keep=2) as checkpoints:
            restored, _ = checkpoints.restore(k, targets)
        back = flat(restored)
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
    specs = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in jax.tree_util.tree_leaves_with_path(state)}
    step = int(state["step"])
    _, losses = run(state, range(2, 4))  # donates state
    write("restore.json", {
        "params": diff(reference, got, "['params']"),
        "moments": diff(reference, got, "['opt_state']"),
        "keys_equal": sorted(reference) == sorted(got),
        "mu_keys": sum(".mu" in k or ".nu" in k for k in got),
        "step": step, "meta_step": meta["step"], "losses": losses,
        "n_devices": jax.device_count(), "specs": specs,
    })  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
