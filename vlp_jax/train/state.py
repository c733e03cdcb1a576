"""The whole training state as one pytree (what a checkpoint holds, besides the data position)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """step int32 []; params; opt_state; aux (method state: EMA teachers, queues, counters);
    rng: raw uint32 key data [2] from which each step's key is derived by `fold_in(step)`;
    nonfinite: int32 [] count of skipped non-finite updates."""

    step: jax.Array
    params: Any
    opt_state: Any
    aux: Any
    rng: jax.Array
    nonfinite: jax.Array


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the current step: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
