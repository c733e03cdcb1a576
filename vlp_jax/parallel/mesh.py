"""Device mesh built from `config.mesh`, and host-local batches made global arrays."""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.config_schema import resolve_part

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")   # the batch is split over every axis that is not `model`


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves sizes (one may be -1: all remaining devices); validates names and product.

    Raises ValueError naming the field when a name is unknown or the sizes do not fit.
    """
    axes = dict(axes)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh.axes has unknown axes {sorted(unknown)}; valid: {MESH_AXES}")
    free = [k for k, v in axes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh.axes may set at most one axis to -1, got {free}")
    fixed = math.prod(v for v in axes.values() if v != -1)
    if any(v < 1 and v != -1 for v in axes.values()):
        raise ValueError(f"config.mesh.axes sizes must be positive or -1, got {axes}")
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh.axes {axes}: {num_devices} devices are not divisible "
                             f"by the fixed axes' product {fixed}")
        axes[free[0]] = num_devices // fixed
    if math.prod(axes.values()) != num_devices:
        raise ValueError(f"config.mesh.axes {axes} needs {math.prod(axes.values())} devices, "
                         f"but {num_devices} are available")
    return {k: axes.get(k, 1) for k in MESH_AXES}


def make_mesh(mesh_cfg: ml_collections.ConfigDict | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'model') in Auto (global-view) mode.

    `mesh_cfg.axes` maps axis names to sizes; the default puts every device on `data`.
    `mesh_cfg.num_devices` (None = all) builds the mesh over the first N devices only: tests
    use 1 to compile single-device properties once instead of 8-way on a 2-core machine.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh_cfg = resolve_part("mesh", mesh_cfg)      # defaults: vlp_jax/parallel/fields.py
    num = mesh_cfg.num_devices
    if num is not None:
        if jax.process_count() > 1:
            raise ValueError("config.mesh.num_devices is for single-process runs; with "
                             f"{jax.process_count()} processes every device must be in the mesh")
        if not 1 <= num <= len(devices):
            raise ValueError(f"config.mesh.num_devices={num} must be between 1 and the "
                             f"{len(devices)} available devices")
        devices = devices[:num]
    axes = dict(mesh_cfg.axes)
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                         axis_types=(AxisType.Auto,) * len(shape))


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """x [B, ...] pinned to the batch layout of the mesh in context (`jax.sharding.
    use_abstract_mesh`, which the train step and the predictors set): B split over the batch
    axes, the other dimensions replicated.

    The encoders call it on the residual stream after every block: without it, under `fsdp`
    XLA's partitioner may follow the parameters' `embed` split and gather full-batch
    activations instead of the (small) parameters (measured in docs/scaling.md: temporaries
    doubled against data parallelism). A no-op outside a mesh context, when the batch axes
    have size 1 or are manual (inside shard_map), and when they do not divide B (batch-1
    initialisation)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    manual = set(mesh.manual_axes)
    axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    if not axes or manual & set(axes) or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def traced_on(mesh: Mesh, fn):
    """fn, traced with `mesh` as the abstract mesh in context (for `constrain_to_batch`): wrap
    the function given to jax.jit with it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
