"""UNITER's per-step task mixing (Chen et al. 2020, sec. 3.2 "Pre-training tasks").

Instead of summing every objective each step, UNITER samples one pre-training task per
mini-batch with probability proportional to its mix ratio (e.g. itm 6-9, mlm 8-12, mrfr 4-6,
mrc-kl 4-6) and optimises only that task's loss:

    t ~ Categorical(r / sum r),    L = L_t.

`mix_losses` runs the chosen objective alone with `lax.switch`, so only one task's forward
and backward pass executes per step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _log_probs(ratios: Sequence[float]) -> jax.Array:
    r = np.asarray(ratios, np.float64)
    if r.ndim != 1 or r.size == 0 or np.any(r < 0) or not np.isfinite(r).all() or r.sum() <= 0:
        raise ValueError(f"task ratios (task_ratios) must be a non-empty list of finite values "
                         f">= 0 with a positive sum, got {list(ratios)}")
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(r / r.sum()), jnp.float32)   # ratio 0 -> -inf: never drawn


def sample_task(rng: jax.Array, ratios: Sequence[float]) -> jax.Array:
    """Index of the task of this step, drawn with P(t) = r_t / sum r. Returns int32 []."""
    return jax.random.categorical(rng, _log_probs(ratios)).astype(jnp.int32)


def mix_losses(rng: jax.Array, loss_fns: Sequence[Callable[[], tuple[jax.Array, dict]]],
               ratios: Sequence[float]) -> tuple[jax.Array, dict]:
    """Runs one objective, sampled by `ratios`, and returns its (loss, metrics).

    Args:
      rng: PRNG key (the same on every device, so all devices pick the same task).
      loss_fns: zero-argument functions returning (loss [], metrics dict of arrays).
      ratios: one non-negative mix ratio per function.
    Returns:
      (loss float32 [], metrics): the union of every branch's metric keys, a branch's missing
      keys filled with zeros (shapes must agree across branches; dtypes are promoted), plus
      `task_id` int32 [] = the index of the task that ran.
    """
    if len(loss_fns) != len(ratios):
        raise ValueError(f"mix_losses got {len(loss_fns)} loss functions but {len(ratios)} "
                         f"task ratios")
    task = sample_task(rng, ratios)
    shapes = [jax.eval_shape(fn)[1] for fn in loss_fns]
    union: dict[str, jax.ShapeDtypeStruct] = {}
    for metrics in shapes:
        for key, s in metrics.items():
            if key in union and union[key].shape != s.shape:
                raise ValueError(f"metric {key!r} has shape {s.shape} in one task and "
                                 f"{union[key].shape} in another")
            dtype = s.dtype if key not in union else jnp.result_type(union[key].dtype, s.dtype)
            union[key] = jax.ShapeDtypeStruct(s.shape, dtype)
    if "task_id" in union:
        raise ValueError("a task's metrics may not use the reserved key 'task_id'")

    def branch(fn):
        def run():
            loss, metrics = fn()
            full = {k: jnp.asarray(metrics[k], s.dtype) if k in metrics
                    else jnp.zeros(s.shape, s.dtype) for k, s in union.items()}
            return jnp.asarray(loss, jnp.float32), full
        return run

    loss, metrics = jax.lax.switch(task, [branch(fn) for fn in loss_fns])
    return loss, dict(metrics, task_id=task)
