"""An exponential-moving-average (mean) teacher kept in a method's aux state.

    teacher <- m * teacher + (1 - m) * student          (after every optimizer step)

as in MoCo / BYOL / DINO and the CLIP variants built on them (A-CLIP, MaskCLIP). The teacher
copies the top-level parameter subtrees a method names (`teacher_keys`), is placed exactly like
those parameters (`aux_shardings` follows the param shardings, so an FSDP- or tensor-sharded
student has an identically sharded teacher) and never receives gradients.

A method mixes `EmaTeacherMixin` in before its Method base and sets `config.ema_momentum`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

DUAL_ENCODER_KEYS = ("image_tower", "text_tower", "image_proj", "text_proj", "logit_scale",
                     "logit_bias")


def select(tree: dict, keys: Sequence[str]) -> dict:
    """The top-level subtrees of `tree` named in `keys` (missing names skipped)."""
    return {k: tree[k] for k in keys if k in tree}


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """m * teacher + (1 - m) * student, leaf by leaf (float leaves; others copied)."""
    def mix(t, s):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            return s
        return (momentum * t.astype(jnp.float32)
                + (1.0 - momentum) * s.astype(jnp.float32)).astype(t.dtype)
    return jax.tree.map(mix, teacher, student)


class EmaTeacherMixin:
    """init_aux / aux_shardings / after_update for aux = {'teacher': EMA of selected params}."""

    extra_teacher_keys = ()   # head subtrees the teacher also averages (set in __post_init__)

    def teacher_keys(self) -> tuple[str, ...]:
        return DUAL_ENCODER_KEYS + tuple(self.extra_teacher_keys)

    def ema_momentum(self) -> float:
        m = self.config.get("ema_momentum", 0.99)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"method.ema_momentum must be in [0, 1), got {m}")
        return m

    def init_aux(self, params):
        # `+ 0` makes the teacher its own buffers (the train step donates the whole state).
        return {"teacher": jax.tree.map(lambda x: x + jnp.zeros((), x.dtype),
                                        select(params, self.teacher_keys()))}

    def aux_shardings(self, abstract_aux, param_shardings):
        return {"teacher": select(param_shardings, self.teacher_keys())}

    def after_update(self, params, aux, step):
        teacher = ema_update(aux["teacher"], select(params, self.teacher_keys()),
                             self.ema_momentum())
        return dict(aux, teacher=teacher)
