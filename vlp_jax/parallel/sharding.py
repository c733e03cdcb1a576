"""Placement of parameters, optimizer state and losses on the mesh.

Parameters carry logical axis names (`vlp_jax.nn.partitioning`); a rule table maps each
logical name to a mesh axis (or None = replicated). Layouts:

    data     every parameter replicated, batch split over `data`          (DDP)
    fsdp     `embed`-like axes split over `fsdp`; batch over data x fsdp  (ZeRO-3 / FSDP)
    model    heads and MLP units split over `model` (Megatron-style tensor parallelism)

The rules below are the defaults; `config.mesh.rules` may replace them. A dimension that a
rule maps to a mesh axis it does not divide is replicated instead, with a `ShardingFallbackWarning`
naming the parameter, the dimension and the axis (each device then holds the whole dimension:
on a pod that is a memory cliff, not a detail).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.config_schema import resolve_part
from vlp_jax.parallel.mesh import batch_axes

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("patch", None),
    ("pos", None),
    ("proj", None),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
)


def logical_rules(mesh_cfg=None) -> tuple[tuple[str, Any], ...]:
    rules = resolve_part("mesh", mesh_cfg).rules
    if rules:
        return tuple((str(k), v) for k, v in rules)
    return DEFAULT_RULES


class ShardingFallbackWarning(UserWarning):
    """A parameter dimension is replicated because its mesh axis does not divide it."""


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "<array>") -> P:
    """Drops mesh axes from a spec where they do not divide the dimension (or are size 1).

    Dropping an axis of size > 1 replicates that dimension on every device of the axis; it
    warns (`ShardingFallbackWarning`) naming `name` (the parameter path), the dimension and
    the axis. Size-1 axes are dropped silently (nothing is split either way).
    """
    fitted = []
    for i, (dim, axis) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = 1
        for a in names:
            size *= mesh.shape[a]
        fits = names and size > 1 and dim % size == 0
        if names and size > 1 and not fits:
            warnings.warn(
                f"parameter {name} {tuple(shape)}: dimension {i} (size {dim}) is not divisible "
                f"by mesh axis {axis!r} (size {size}); that dimension is replicated instead of "
                f"sharded", ShardingFallbackWarning, stacklevel=3)
        fitted.append(axis if fits else None)
    return P(*fitted)


def _path_name(path) -> str:
    """'/'-joined parameter path ('text_tower/layer_0/mlp/kernel') of a tree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules) -> Any:
    """NamedSharding for each parameter, from its logical annotation and the rules.

    `abstract_boxed_params` is the (eval_shape'd) output of `model.init(...)['params']` with
    its `nn.LogicallyPartitioned` boxes; the result has the unboxed tree structure.
    """
    specs = nn.get_partition_spec(abstract_boxed_params)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_boxed_params)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh,
                                                            _path_name(path))),
        mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params, param_sharding,
                        mesh: Mesh) -> Any:
    """Shardings of `tx.init(params)`: each moment follows its parameter, the rest replicated.

    A state leaf belongs to a parameter when its key path ends with that parameter's key path
    and the shapes agree; this holds through any optax wrapper (chain, masked, multi_transform).
    """
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    by_path = {}
    for (path, x), (_, s) in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                 jax.tree_util.tree_leaves_with_path(param_sharding)):
        by_path[tuple(str(k) for k in path)] = (x.shape, s)
    replicated = NamedSharding(mesh, P())

    def place(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == getattr(leaf, "shape", None):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(place, abstract_state)


def shard_batch_fn(fn: Callable, mesh: Mesh, num_batch_args: int, num_other_args: int = 0
                   ) -> Callable:
    """Wraps `fn(*batch_args, *other_args, axis_name=...)` in `jax.shard_map` over the batch axes.

    The first `num_batch_args` arguments are split along dim 0 over the batch axes, the other
    arguments are replicated, and every output must be replicated (a loss and its metrics,
    already reduced across devices inside `fn`).
    """
    axes = batch_axes(mesh)
    in_specs = (P(axes),) * num_batch_args + (P(),) * num_other_args

    def body(*args):
        return fn(*args, axis_name=axes)

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=True)
