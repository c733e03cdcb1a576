"""Orbax checkpoints of the train state plus the data iterator position.

A checkpoint is a directory `WORKDIR/checkpoints/<step>/` with two items: `state` (the
TrainState arrays, restored straight into their mesh shardings) and `data` (the grain
iterator state as JSON). Orbax writes to a temporary directory and renames it when complete,
so a save interrupted mid-write is never listed as a valid step. Nothing is pickled.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vlp_jax.train.errors import CheckpointMismatchError, NoCheckpointError, one_line

__all__ = ["CheckpointMismatchError", "Checkpointer", "NoCheckpointError",
           "abstract_with_shardings", "describe_mismatch", "flat_shapes"]


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_shapes(tree) -> dict[str, tuple]:
    """{'params/image_tower/...': shape} for every array-like leaf of a (metadata) tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out["/".join(_key_name(k) for k in path)] = tuple(shape)
    return out


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple], limit: int = 20) -> str:
    """Human-readable list of missing, unexpected and reshaped arrays ('' when they match)."""
    lines = []
    for key in sorted(set(expected) - set(saved)):
        lines.append(f"  missing in checkpoint: {key} {expected[key]}")
    for key in sorted(set(saved) - set(expected)):
        lines.append(f"  not in model:          {key} {saved[key]}")
    for key in sorted(set(saved) & set(expected)):
        if saved[key] != expected[key]:
            lines.append(f"  shape differs:         {key} checkpoint {saved[key]} vs model "
                         f"{expected[key]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines)


def abstract_with_shardings(abstract_tree, shardings) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str, keep: int = 2, every: int = 1000):
        self.every = every
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write (every `every` steps)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: Any, force: bool = False) -> bool:
        """Starts an (asynchronous) save; all processes must call it. Returns whether it saved.

        `data_state`: the data iterator's state, or a function returning it, called only
        when this step is really saved (taking the iterator's state costs host work)."""
        if not force and not self.due(step):
            return False
        if step in self.manager.all_steps():
            return False
        if callable(data_state):
            data_state = data_state()
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any] | None:
        """(state, data_state) of `step` (default latest) placed as `abstract_state`; None if none."""
        if step is not None and step not in self.manager.all_steps():
            raise NoCheckpointError(f"no checkpoint step {step} in {self.manager.directory}; "
                                    f"steps: {sorted(self.manager.all_steps())}")
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        self.check_compatible(step, abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatchError listing keys and shapes if `step` does not fit."""
        saved = flat_shapes(self.manager.item_metadata(step)["state"].tree)
        problems = describe_mismatch(saved, flat_shapes(abstract_state), limit=10_000)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.manager.directory} does not match this model "
                f"(was it written by another model or config?): {one_line(problems)}",
                details=problems)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
