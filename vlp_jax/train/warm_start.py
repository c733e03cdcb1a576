"""`config.init`: initialise part of the parameters from another run's checkpoint.

LiT (Zhai et al. 2022) locks an image tower trained earlier and trains only a text tower
against it; fine-tuning and importers start whole towers from pretrained weights. This module
reads *only* the mapped parameter subtrees out of a checkpoint our trainer wrote
(`WORKDIR/checkpoints/<step>/state`), on the host (numpy), without the optimizer state or
anything else, checks their shapes against the new model and puts them onto the new
parameters' shardings. It runs after the fresh parameters are initialised, never inside
traced code; the optimizer state and the method's aux (EMA teachers) are initialised from the
spliced parameters afterwards (`vlp_jax.train.step.init_state`).

config.init fields (top level):
  workdir: the earlier run's WORKDIR (or its `checkpoints` directory); '' = no warm start.
  step: the checkpoint step to read; -1 (default) = the latest.
  mapping: {destination prefix: source prefix}, '/'-joined parameter paths, e.g.
    {'image_tower': 'image_tower', 'image_proj': 'image_proj'}; the destination subtree must
    have exactly the source subtree's arrays and shapes (dtypes are cast to the model's).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from vlp_jax.train.checkpoint import CheckpointMismatchError, describe_mismatch, flat_shapes


class WarmStartError(CheckpointMismatchError):
    """The init checkpoint is missing, or its subtrees do not fit the new model."""


def checkpoint_directory(path: str) -> str:
    """WORKDIR or WORKDIR/checkpoints -> the directory holding the numbered steps."""
    path = os.path.abspath(path)
    nested = os.path.join(path, "checkpoints")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(path):
        return path
    raise WarmStartError(f"init.workdir={path!r} does not exist")


def _split(path: str) -> tuple[str, ...]:
    keys = tuple(k for k in str(path).split("/") if k)
    if not keys:
        raise ValueError("init.mapping holds an empty path; give e.g. 'image_tower'")
    return keys


def _get(tree: Any, keys: Sequence[str], where: str) -> Any:
    for depth, key in enumerate(keys):
        if not isinstance(tree, Mapping) or key not in tree:
            have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise WarmStartError(f"{where} has no parameter subtree "
                                 f"{'/'.join(keys[:depth + 1])!r}; found {have}")
        tree = tree[key]
    return tree


def _nest(keys: Sequence[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                  "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False))


def _resolve_step(directory: str, step: int) -> int:
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps())
    finally:
        manager.close()
    if not steps:
        raise WarmStartError(f"no checkpoint in {directory} to initialise from (init.workdir)")
    if step < 0:
        return steps[-1]
    if step not in steps:
        raise WarmStartError(f"no checkpoint step {step} in {directory}; steps: {steps}")
    return step


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


@functools.lru_cache(maxsize=2)
def _load(directory: str, paths: tuple[str, ...], step: int) -> dict:
    manager = _manager(directory)
    try:
        saved = manager.item_metadata(step)["state"].tree["params"]
        item = {}
        for path in paths:
            meta = _get(saved, _split(path), f"checkpoint {directory} step {step}")
            sub = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
            item = _merge(item, _nest(_split(path), sub))
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": restore_args},
            partial_restore=True)))
        return restored["state"]["params"]
    finally:
        manager.close()


def load_param_subtrees(workdir: str, paths: Sequence[str], step: int = -1) -> tuple[int, dict]:
    """(step, {'image_tower': numpy tree, ...}) read from a trainer checkpoint, nothing else.

    `paths` are '/'-separated keys under the checkpoint's `params`; the result is the nested
    dict holding just those subtrees (host numpy arrays; cached, so calling it again is free).
    """
    directory = checkpoint_directory(workdir)
    step = _resolve_step(directory, int(step))
    return step, _load(directory, tuple(paths), step)


def _unboxed(x):
    return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _set(tree: Mapping, keys: Sequence[str], value: Any) -> dict:
    """A copy of the nested dict `tree` with tree[k0][k1]... = value."""
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else _set(tree[keys[0]], keys[1:], value)
    return out


def check_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    """{dest: src} as plain strings; raises on an empty mapping or overlapping destinations."""
    mapping = {str(d): str(s) for d, s in dict(mapping or {}).items()}
    if not mapping:
        raise ValueError("init.workdir is set but init.mapping is empty: map destination "
                         "parameter prefixes to source prefixes, e.g. "
                         "{'image_tower': 'image_tower'}")
    dests = [_split(d) for d in mapping]
    for a in dests:
        for b in dests:
            if a != b and b[:len(a)] == a:
                raise ValueError(f"init.mapping destinations {'/'.join(a)!r} and "
                                 f"{'/'.join(b)!r} overlap")
    return mapping


def splice_mapped(params: Any, loaded: dict, mapping: Mapping[str, str],
                  source: str = "checkpoint",
                  put: Callable[[Any, np.ndarray, Any], Any] | None = None,
                  shardings: Any = None) -> Any:
    """`params` with each destination subtree replaced by its mapped source subtree of `loaded`.

    `put(old_leaf, new_value, sharding_or_None) -> leaf` makes the new leaf (default: a numpy
    array cast to the old dtype; Flax partitioning boxes are kept with their values swapped).
    Raises WarmStartError listing every missing, unexpected or reshaped array of a subtree.
    """
    put = put or (lambda old, value, _: np.asarray(value, dtype=_unboxed(old).dtype))
    for dest, src in mapping.items():
        dkeys, skeys = _split(dest), _split(src)
        target = _get(params, dkeys, "the model")
        new = _get(loaded, skeys, source)
        expected = flat_shapes(jax.tree.map(_unboxed, target, is_leaf=_is_box))
        problems = describe_mismatch(flat_shapes(new), expected)
        if problems:
            raise WarmStartError(f"cannot initialise {dest!r} from {src!r} of {source}: the "
                                 f"saved subtree does not fit this model:\n{problems}")
        target_sh = _get(shardings, dkeys, "the shardings") if shardings is not None else \
            jax.tree.map(lambda _: 0, target, is_leaf=_is_box)

        def one(old, value, sharding):
            leaf = put(old, value, sharding)
            return old.replace_boxed(leaf) if _is_box(old) else leaf

        params = _set(params, dkeys, jax.tree.map(one, target, new, target_sh, is_leaf=_is_box))
    return params


def splice(params: Any, loaded: dict, paths: Sequence[str], source: str = "checkpoint") -> Any:
    """`splice_mapped` with each path mapped to itself."""
    return splice_mapped(params, loaded, {p: p for p in paths}, source)


def to_sharding(old, value: np.ndarray, sharding) -> jax.Array:
    """Host numpy value -> global array of `old`'s dtype on `sharding` (every process passes
    the same full value; each places the shards its devices hold)."""
    value = np.asarray(value, dtype=np.dtype(old.dtype))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def apply_init(params: Any, init_cfg, shardings: Any) -> Any:
    """Applies `config.init` (None or empty workdir = unchanged) to fresh, sharded `params`:
    the mapped subtrees are read on the host and placed onto `shardings` (the params' own)."""
    if not init_cfg or not init_cfg.get("workdir", ""):
        return params
    mapping = check_mapping(init_cfg.get("mapping", {}))
    step, loaded = load_param_subtrees(init_cfg["workdir"], tuple(sorted(set(mapping.values()))),
                                       int(init_cfg.get("step", -1)))
    source = f"{checkpoint_directory(init_cfg['workdir'])} step {step}"
    return splice_mapped(params, loaded, mapping, source, put=to_sharding, shardings=shardings)
