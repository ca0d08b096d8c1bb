"""The layer scan's parameter layout, and the one conversion between it and one entry per block.

With ``model.scan_layers`` and at least two repeating units (a unit is ``layer_period`` blocks:
one, or ``moe.every`` ending in the MoE one), the Transformer stores the repeating blocks
*stacked*: ``stacked[j]`` is one Block for position j of the unit whose parameters have a
leading [units] axis (logical name "layers"; unit r's copy at index r), and ``blocks`` keeps
only the n_layers % period dense blocks left over. So the optimiser updates a few stacked
leaves and the scan reads them as stored, whatever the depth. Without the scan ``blocks``
holds every block. A layer's parameters therefore live at

    per-block layout   blocks/i/...                          (i < units * period)
    stacked layout     stacked/(i % period)/...[i // period]
    per-block layout   blocks/(units * period + k)/...   <->   stacked layout  blocks/k/...

``to_layout`` maps any pytree between the two by those paths: the params, and every
params-shaped part of an optimiser state (Adam's mu and nu), each an nnx State with a
``blocks`` or ``stacked`` entry. ``restore_state`` uses it so that a checkpoint written in one
layout restores into the other (``model.scan_layers`` is an execution key; checkpoints from
before stacked storage are per-block). Values are moved, never recomputed: a round trip is exact.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from llm.config import ModelConfig

LAYERS = "layers"  # the logical name of the stacking axis (llm.sharding maps it to no mesh axis)
STACKED, BLOCKS = "stacked", "blocks"  # the Transformer's attributes (and state keys) of the two kinds of block


def layer_period(cfg: ModelConfig) -> int:
    """Blocks in one repeating unit: moe.every (every-1 dense blocks, then an MoE one), else 1."""
    return cfg.moe.every if cfg.moe is not None else 1


def stacked_units(cfg: ModelConfig) -> int:
    """Repeating units the model stores stacked: n_layers // layer_period with the scan on and at
    least two of them (one unit gains nothing from a scan), else 0 (every block stored alone)."""
    units = cfg.n_layers // layer_period(cfg)
    return units if cfg.scan_layers and units >= 2 else 0


def stack(trees: Sequence[Any]) -> Any:
    """One tree whose leaves are those of ``trees`` (equal structure) stacked on a new first axis;
    every nnx.Variable's logical names gain a leading "layers"."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    def named(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * (jnp.ndim(variable.get_value()) - 1)
        return variable.replace(out_sharding=(LAYERS, *names))

    return jax.tree.map(named, stacked, is_leaf=_is_variable)


def unstack(tree: Any, r: int) -> Any:
    """Entry ``r`` of a ``stack``-ed tree, with the "layers" name dropped again."""
    sliced = jax.tree.map(lambda leaf: leaf[r], tree)

    def named(variable):
        return variable.replace(out_sharding=tuple(variable.get_metadata()["out_sharding"][1:]))

    return jax.tree.map(named, sliced, is_leaf=_is_variable)


def unstacked_ndim(variable: nnx.Variable) -> int:
    """Axes of one layer's copy of a parameter: its logical names other than "layers" (its ndim
    when it has no names). The same in both layouts: llm.optim decays by it."""
    names = variable.get_metadata().get("out_sharding")
    return sum(name != LAYERS for name in names) if names else jnp.ndim(variable.get_value())


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` (a train state, params, or any pytree holding model states) is in the stacked layout."""
    return any(_is_model_state(node) and STACKED in node for node in jax.tree.leaves(tree, is_leaf=_is_model_state))


def to_layout(tree: Any, cfg: ModelConfig, stacked: bool) -> Any:
    """``tree`` with every model state in it in the stacked layout of ``cfg`` (``stacked=True``: the
    repeating blocks as ``stacked_units`` x ``layer_period``, scan or not) or one entry per block.

    tree: any pytree (a train state {params, opt_state, step}, params alone; arrays or tracers,
    e.g. under ``jax.eval_shape`` or ``jax.jit``). A model state is an nnx State mapping with a
    ``blocks`` or ``stacked`` entry; states already in the asked layout, and everything else,
    come back unchanged.
    """
    units = cfg.n_layers // layer_period(cfg)
    if units < 2:  # the two layouts coincide
        return tree
    period = layer_period(cfg)

    def convert(node):
        if not _is_model_state(node) or (STACKED in node) == stacked:
            return node
        return _to_stacked(node, period, units) if stacked else _to_blocks(node, period, units)

    return jax.tree.map(convert, tree, is_leaf=_is_model_state)


def _to_stacked(state: Mapping, period: int, units: int) -> Mapping:
    items = _raw_items(state)
    blocks, scanned = items.pop(BLOCKS), period * units
    items[STACKED] = {j: stack([blocks[r * period + j] for r in range(units)]) for j in range(period)}
    if len(blocks) > scanned:
        items[BLOCKS] = {i - scanned: blocks[i] for i in range(scanned, len(blocks))}
    return type(state)(items)


def _to_blocks(state: Mapping, period: int, units: int) -> Mapping:
    items = _raw_items(state)
    stacked, leftover = items.pop(STACKED), items.pop(BLOCKS, {})
    blocks = {r * period + j: unstack(stacked[j], r) for r in range(units) for j in range(period)}
    blocks.update({period * units + k: leftover[k] for k in range(len(leftover))})
    items[BLOCKS] = blocks
    return type(state)(items)


def _raw_items(state: Mapping) -> dict:
    # An nnx State keeps nested states as plain dicts (its pytree children); so do we, so that a
    # converted tree has exactly the structure of one the model gives (jit compares them).
    return dict(getattr(state, "raw_mapping", state))


def _is_model_state(node: Any) -> bool:
    return isinstance(node, Mapping) and (BLOCKS in node or STACKED in node)


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


# --------------------------------------------------------------------------- restoring checkpoints


def restore_state(checkpoints, step: int, like: Any, cfg: ModelConfig) -> tuple[Any, dict[str, Any]]:
    """``checkpoints.restore(step, like)`` (llm.checkpoint) whichever layout the checkpoint was saved
    in: read in its own layout (found from the saved tree), then converted into ``like``'s, with
    ``like``'s shardings. Returns (state, meta)."""
    want = is_stacked(like)
    if cfg.n_layers // layer_period(cfg) < 2:  # one layout only (to_layout's own test): no saved tree to read
        return checkpoints.restore(step, like)
    if (STACKED in checkpoints.saved_tree(step).get("params", {})) == want:
        return checkpoints.restore(step, like)
    saved_like = jax.eval_shape(functools.partial(to_layout, cfg=cfg, stacked=not want), like)
    mesh = _mesh_of(like)
    if mesh is not None:  # read each leaf straight into the layout its parameter has on this mesh
        from llm.sharding import state_shardings

        shardings = state_shardings(saved_like, saved_like["params"], mesh)
        saved_like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), saved_like, shardings)
    state, meta = checkpoints.restore(step, saved_like)
    convert = functools.partial(to_layout, cfg=cfg, stacked=want)
    if mesh is not None and all(isinstance(getattr(leaf, "sharding", None), NamedSharding) for leaf in jax.tree.leaves(like)):
        return jax.jit(convert, out_shardings=jax.tree.map(lambda leaf: leaf.sharding, like))(state), meta
    return convert(state), meta


def _mesh_of(tree: Any) -> jax.sharding.Mesh | None:
    """The mesh of ``tree``'s NamedSharding-ed leaves, or None when it has none."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None
