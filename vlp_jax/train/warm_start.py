"""Warm start: initialise part of a model's parameters from another run's checkpoint.

LiT (Zhai et al. 2022) locks an image tower trained earlier and trains only a text tower
against it. This module reads *only* the requested parameter subtrees (e.g. `image_tower`,
`image_proj`) out of a checkpoint our trainer wrote (`WORKDIR/checkpoints/<step>/state`),
without restoring the optimizer state or anything else, checks their shapes against the new
model and splices them into its freshly initialised parameters.

config.method.warm_start fields:
  workdir: the earlier run's WORKDIR (or its `checkpoints` directory).
  params: parameter subtrees to copy, '/'-separated paths under `params`
    (e.g. ['image_tower', 'image_proj']).
  step: the checkpoint step to read; -1 (default) = the latest.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vlp_jax.train.checkpoint import CheckpointMismatchError, describe_mismatch, flat_shapes


class WarmStartError(CheckpointMismatchError):
    """The warm-start checkpoint is missing, or its subtrees do not fit the new model."""


def checkpoint_directory(path: str) -> str:
    """WORKDIR or WORKDIR/checkpoints -> the directory holding the numbered steps."""
    path = os.path.abspath(path)
    nested = os.path.join(path, "checkpoints")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(path):
        return path
    raise WarmStartError(f"method.warm_start.workdir={path!r} does not exist")


def _split(path: str) -> tuple[str, ...]:
    keys = tuple(k for k in path.split("/") if k)
    if not keys:
        raise ValueError("method.warm_start.params holds an empty path; give e.g. 'image_tower'")
    return keys


def _get(tree: Any, keys: Sequence[str], where: str) -> Any:
    for depth, key in enumerate(keys):
        if not isinstance(tree, dict) or key not in tree:
            have = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
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
        raise WarmStartError(f"no checkpoint in {directory} to warm-start from")
    if step < 0:
        return steps[-1]
    if step not in steps:
        raise WarmStartError(f"no checkpoint step {step} in {directory}; steps: {steps}")
    return step


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


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


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


def splice(params: Any, loaded: dict, paths: Sequence[str], source: str = "checkpoint") -> Any:
    """`params` with each subtree in `paths` replaced by the one in `loaded`.

    `params` may hold Flax partitioning boxes (`nn.LogicallyPartitioned`); they are kept,
    with their values swapped. Raises WarmStartError listing every missing, unexpected or
    reshaped array when a subtree does not fit.
    """
    for path in paths:
        keys = _split(path)
        target = _get(params, keys, "the model")
        new = _get(loaded, keys, source)
        is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
        expected = flat_shapes(jax.tree.map(_unboxed, target, is_leaf=is_box))
        problems = describe_mismatch(flat_shapes(new), expected)
        if problems:
            raise WarmStartError(f"cannot warm-start {path!r} from {source}: the saved subtree "
                                 f"does not fit this model:\n{problems}")

        def put(old, value):
            value = jnp.asarray(value, dtype=_unboxed(old).dtype)
            return old.replace_boxed(value) if is_box(old) else value

        params = _set(params, keys, jax.tree.map(put, target, new, is_leaf=is_box))
    return params


def _set(tree: dict, keys: Sequence[str], value: Any) -> dict:
    """A copy of the nested dict `tree` with tree[k0][k1]... = value."""
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else _set(tree[keys[0]], keys[1:], value)
    return out


def apply_warm_start(params: Any, cfg) -> Any:
    """Applies `config.method.warm_start` (None or empty = unchanged) to fresh `params`."""
    if not cfg or not cfg.get("workdir", None):
        return params
    paths = tuple(cfg.get("params", ()))
    if not paths:
        raise ValueError("method.warm_start.params must list the subtrees to copy, "
                         "e.g. ['image_tower', 'image_proj']")
    step, loaded = load_param_subtrees(cfg.workdir, paths, cfg.get("step", -1))
    return splice(params, loaded, paths, f"{checkpoint_directory(cfg.workdir)} step {step}")


def trainable_mask(params: Any, frozen: Sequence[str]) -> Any:
    """Bool tree like `params`: False under every '/'-path in `frozen` (the optimizer's mask).

    LiT freezes ['image_tower', 'image_proj']; a fixed temperature freezes ['logit_scale'].
    Raises ValueError naming a path that is not in the model.
    """
    mask = jax.tree.map(lambda _: True, params)
    for path in frozen:
        keys = _split(path)
        try:
            sub = _get(mask, keys, "the model")
        except WarmStartError as e:
            raise ValueError(f"method.frozen: {e}") from None
        mask = _set(mask, keys, jax.tree.map(lambda _: False, sub))
    return mask
