"""The one momentum (EMA) teacher and the one feature queue shared by objectives.

EMA teacher (MoCo / BYOL / DINO; ALBEF's momentum model, Li et al. 2021 sec. 3.3):

    theta_t <- m * theta_t + (1 - m) * theta_s          (after every optimizer step)

over a *selection* of the top-level parameter subtrees: `include` names the subtrees kept (None:
all), `exclude` removes subtrees from that (ALBEF keeps everything but the temperature and the
ITM head; A-CLIP / MaskCLIP keep the dual encoder and the heads they distil through). The
teacher is placed exactly like the parameters it copies (`shardings` selects the parameter
shardings) and never receives gradients.

Feature queue: a FIFO ring buffer of past (momentum) features, MoCo / ALBEF's extra contrastive
negatives; the pure functions are `vlp_jax.losses.distill.queue_*`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from vlp_jax.losses.distill import queue_init, queue_push, queue_valid_mask


def select_params(tree: dict, include: Sequence[str] | None = None,
                  exclude: Sequence[str] = ()) -> dict:
    """Top-level subtrees of `tree`: those in `include` (None: all) minus those in `exclude`;
    names absent from `tree` are skipped."""
    keys = list(tree) if include is None else [k for k in include if k in tree]
    return {k: tree[k] for k in keys if k not in set(exclude)}


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """m * teacher + (1 - m) * student, leaf by leaf, computed in float32 and stored in the
    teacher leaf's dtype; non-float leaves are copied from the student."""
    def mix(t, s):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            return s
        return (momentum * t.astype(jnp.float32)
                + (1.0 - momentum) * s.astype(jnp.float32)).astype(t.dtype)
    return jax.tree.map(mix, teacher, student)


@dataclasses.dataclass(frozen=True)
class EmaTeacher:
    """EMA copy of a parameter selection (see the module docstring)."""

    momentum: float
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {self.momentum}")

    def select(self, tree: dict) -> dict:
        return select_params(tree, self.include, self.exclude)

    def init(self, params: dict) -> dict:
        # `+ 0` gives the teacher its own buffers (the train step donates the whole state).
        return jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), self.select(params))

    def shardings(self, param_shardings: dict) -> dict:
        return self.select(param_shardings)

    def update(self, teacher: dict, params: dict) -> dict:
        return ema_update(teacher, self.select(params), self.momentum)

    @staticmethod
    def full_params(params: dict, teacher: dict) -> dict:
        """The momentum model's parameters: the student's with the teacher's subtrees over them
        (unselected subtrees come from the student), no gradient through the teacher."""
        return dict(params, **jax.lax.stop_gradient(teacher))


@dataclasses.dataclass(frozen=True)
class FeatureQueue:
    """A ring buffer of `size` feature rows of width `dim` (state: losses.distill.queue_init)."""

    size: int
    dim: int

    def init(self) -> dict:
        return queue_init(self.size, self.dim)

    @staticmethod
    def push(queue: dict, feats: jax.Array) -> dict:
        return queue_push(queue, feats)

    @staticmethod
    def valid(queue: dict) -> jax.Array:
        return queue_valid_mask(queue)
