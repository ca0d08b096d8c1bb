"""One run over many devices: the device mesh and the map from logical axis names to mesh axes.

The model names the axes of its parameters (Flax NNX ``out_sharding`` metadata, see
``logical_param``) and of a few activations (``constrain``) with *logical* names only;
this module is the one place that turns them into mesh axes. The mesh has four axes
(``llm.config.MeshConfig``), built with ``jax.make_mesh`` in the compiler-driven (Auto)
mode: we say how parameters, optimiser state and batches are laid out, and XLA's SPMD
partitioner inserts the collectives.

  data    batch rows split; parameters replicated                      (data parallel)
  fsdp    batch rows split; parameters and optimiser state split too   (FSDP / ZeRO-3)
  tensor  heads, kv heads, MLP hidden units and vocabulary split       (tensor parallel)
  expert  MoE experts split; batch rows split elsewhere                (expert parallel)

The rule (RULES): each logical name maps to a list of mesh axes; a tensor's partition spec
takes, dimension by dimension, the mesh axes of that dimension's name, dropping an axis of
size 1, an axis already used by an earlier dimension of the same tensor (no mesh axis is
used twice in one spec), and an axis that would not divide the dimension evenly. So
activations [batch, seq, embed] under fsdp are split by batch only (embed's fsdp is taken),
and a weight [embed, mlp] is split by fsdp and tensor.

Public surface:
  the mesh        ``make_mesh(cfg)``, ``mesh_shape(cfg, n_devices)``, ``mesh_summary(mesh)``
  the model       ``logical_param(value, names)``, ``constrain(x, names)``
  specs           ``logical_spec(names, axis_sizes, shape)``, ``param_specs``, ``param_shardings``,
                  ``state_shardings`` (params and the optax state that mirrors them; scalars replicated)
  a run           ``state_layout(mesh, state) -> Layout``: the state's shardings, ``batch`` / ``rows`` /
                  ``replicated`` shardings, ``host_rows`` and ``put`` (each host places only its
                  rows: ``jax.make_array_from_process_local_data``), ``on_mesh(fn)`` (``jax.set_mesh``).
To restore a checkpoint onto a mesh, build the targets from ``state_layout(...).state``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llm.config import BATCH_MESH_AXES, MESH_AXES, Config, ConfigError, check_batch_split

# Logical axis name -> the mesh axes that may split it, in order. A name not listed here is an
# error (a typo in the model would otherwise silently replicate a tensor).
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_MESH_AXES,  # ("data", "fsdp", "expert")
    "embed": ("fsdp",),  # d_model of weights (FSDP); in activations fsdp is already taken by batch
    "mlp": ("tensor",),  # d_ff
    "heads": ("tensor",),  # query heads
    "kv_heads": ("tensor",),  # key/value heads (GQA); replicated when fewer than tensor
    "vocab": ("tensor",),
    "expert": ("expert",),  # MoE experts
    "seq": (),  # sequence positions: never split
    "head_dim": (),
    "layers": (),  # a stacked-layers axis (scan)
    "norm": (),
}


# --------------------------------------------------------------------------- the mesh


def mesh_shape(cfg: Config, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes of ``cfg.mesh`` on ``n_devices`` devices, the -1 resolved; ConfigError
    when the sizes do not multiply to the device count or the micro-batch does not split evenly."""
    sizes = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{axis} must be -1 (the rest of the devices) or > 0, got {size}")
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh.{rest[0]} and mesh.{rest[1]} are both -1: at most one mesh axis may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    layout = " x ".join(f"{axis}={size}" for axis, size in sizes.items() if size != 1)
    if rest:
        if n_devices % fixed:
            raise ConfigError(f"mesh {layout}: the other axes take {fixed} devices, which does not divide "
                              f"the {n_devices} devices visible, so mesh.{rest[0]}=-1 has no size")
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh {layout or 'of size 1'} needs {fixed} devices but {n_devices} are visible: "
                          "make the product of the mesh sizes the device count, or set one of them to -1")
    check_batch_split(cfg, sizes)
    return sizes


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The run's device mesh over ``devices`` (default: every device of every process), axes in
    MESH_AXES order, all of them compiler-driven (AxisType.Auto)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto, devices=devices)


def mesh_summary(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What result.json records of the mesh: each axis size and the device count."""
    return {"axes": {name: int(size) for name, size in mesh.shape.items()}, "n_devices": int(mesh.size)}


# --------------------------------------------------------------------------- logical names -> specs


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` holding ``value`` whose axes carry the logical ``names`` (one per axis).

    The names are Flax's partitioning metadata (``out_sharding``); eager sharding is off, so the
    model is built the same with or without a mesh and this module applies the names later.
    """
    names = tuple(names)
    if len(names) != value.ndim:
        raise ValueError(f"{len(names)} logical names {names} for a parameter of shape {value.shape}")
    for name in names:
        _mesh_axes_of(name)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _mesh_axes_of(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in RULES:
        raise ValueError(f"unknown logical axis name {name!r}; llm.sharding.RULES names {', '.join(RULES)}")
    return RULES[name]


def logical_spec(names: Sequence[str | None], axis_sizes: Mapping[str, int], shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec of a tensor whose axes have logical ``names``, on a mesh of ``axis_sizes``.

    Per dimension, the mesh axes of its name (RULES) minus those of size 1, those already used
    by an earlier dimension, and (given ``shape``) those that would not divide it evenly.
    """
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(names):
        split, axes = 1, []
        for axis in _mesh_axes_of(name):
            size = axis_sizes.get(axis, 1)
            if size == 1 or axis in used or (shape is not None and shape[i] % (split * size)):
                continue
            axes.append(axis)
            split *= size
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _param_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical names a parameter was annotated with; () (replicated) when it has none."""
    metadata = variable.get_metadata()
    return tuple(metadata.get("out_sharding") or metadata.get("sharding_names") or ())


def param_specs(params: Any, axis_sizes: Mapping[str, int]) -> Any:
    """A pytree like ``params`` (an nnx State, real or abstract) of PartitionSpecs from its names."""

    def spec(variable):
        names = _param_names(variable)
        shape = variable.get_value().shape
        if names and len(names) != len(shape):  # e.g. a stacked copy: names of the unstacked axes
            raise ValueError(f"logical names {names} do not fit a parameter of shape {shape}")
        return logical_spec(names, axis_sizes, shape)

    return jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for every parameter of ``params`` (an nnx State) on ``mesh``."""
    specs = param_specs(params, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))  # arrays and jax.ShapeDtypeStructs alike


def state_shardings(state: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a whole train state (params, optimiser state, step...), real or abstract.

    A leaf whose key path ends with a parameter's path and has its shape (the parameters
    themselves, Adam's moments, any optax state that mirrors the parameters) is sharded like
    that parameter; every other leaf (step counts, scalars) is replicated.
    """
    specs = jax.tree.leaves(param_specs(params, dict(mesh.shape)), is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_params = jax.tree_util.tree_leaves_with_path(params)  # the same order as the specs
    by_path = {tuple(path): (_shape(leaf), spec) for (path, leaf), spec in zip(flat_params, specs)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            found = by_path.get(path[start:])
            if found is not None and found[0] == _shape(leaf):
                return NamedSharding(mesh, found[1])
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, state)


# --------------------------------------------------------------------------- batches and activations


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of an [batch, ...] input: rows split over the batch axes, the rest whole."""
    return NamedSharding(mesh, logical_spec(("batch",) + ("seq",) * (ndim - 1), dict(mesh.shape)))


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows of a global [batch, ...] array that this process's devices hold (one contiguous range)."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    starts, stops = [], []
    for index in index_map.values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    first, last = min(starts), max(stops)
    covered = np.zeros(global_shape[0], bool)
    for start, stop in zip(starts, stops):
        covered[start:stop] = True
    if not covered[first:last].all():
        raise ValueError(f"this process's rows of a {tuple(global_shape)} batch are not contiguous under {sharding.spec}")
    return slice(first, last)


def place_batch(host_rows: np.ndarray, sharding: NamedSharding, global_shape: Sequence[int]) -> jax.Array:
    """A global batch array from the rows this process built (``process_rows`` of the batch):
    each host hands over only its part (``jax.make_array_from_process_local_data``)."""
    return jax.make_array_from_process_local_data(sharding, host_rows, tuple(global_shape))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one run's arrays live: its mesh and the shardings of its train state.

    ``state`` is a pytree of NamedShardings shaped like the state ({params, opt_state, step});
    ``state_layout`` builds one. Batches are [batch, ...] arrays split by rows (``batch`` for
    [batch, seq] tokens, ``rows`` for per-row vectors); metrics and scalars are ``replicated``.
    """

    mesh: jax.sharding.Mesh
    state: Any

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh, 2)

    @property
    def rows(self) -> NamedSharding:
        return batch_sharding(self.mesh, 1)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def stacked_batch(self) -> NamedSharding:
        """A stack of [batch, seq] token batches, [steps, batch, seq]: each batch split as ``batch``."""
        return NamedSharding(self.mesh, PartitionSpec(None, *self.batch.spec))

    def host_rows(self, batch_size: int) -> slice:
        """The rows of a [batch_size, ...] batch this process builds and places."""
        return process_rows(self.rows, (batch_size,))

    def put(self, rows: np.ndarray, batch_size: int) -> jax.Array:
        """A global [batch_size, ...] batch from this process's ``rows`` of it (``host_rows``),
        split by rows over the batch axes."""
        sharding = batch_sharding(self.mesh, rows.ndim)
        return place_batch(rows, sharding, (batch_size,) + rows.shape[1:])

    def put_stacked(self, rows_KbT: np.ndarray, batch_size: int) -> jax.Array:
        """A global [steps, batch_size, ...] stack of batches from this process's rows of each
        (``host_rows``, axis 1), laid out as ``stacked_batch``."""
        return place_batch(rows_KbT, self.stacked_batch, (rows_KbT.shape[0], batch_size) + rows_KbT.shape[2:])

    def on_mesh(self, fn):
        """``fn`` called with this mesh set (``jax.set_mesh``), so ``constrain`` sees it while tracing."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with jax.set_mesh(self.mesh):
                return fn(*args, **kwargs)

        return wrapped


def state_layout(mesh: jax.sharding.Mesh, state: Any) -> Layout:
    """The Layout of a train state {params, opt_state, ...} (real or from ``jax.eval_shape``) on ``mesh``."""
    return Layout(mesh, state_shardings(state, state["params"], mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` laid out as its logical axis ``names`` say on the current mesh (``jax.set_mesh``);
    ``x`` unchanged where no mesh is set (a plain jit, a test, llm.population's vmap)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_spec(names, dict(mesh.shape), x.shape))
