"""Collective helpers and L2 normalisation: the layer below losses and models.

Every collective takes `axis_name`: None = the arrays are the whole (global) batch, no
communication; a mesh axis name (or tuple of names) = the caller runs inside `jax.shard_map`
with the batch split over that axis.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps) along the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def all_gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """[n, ...] local rows -> [G, ...] rows of every device, in device order (tiled all-gather
    along `axis_name`; G = n * axis size)."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def row_offset(n: int, axis_name: AxisName) -> jax.Array:
    """Index of this device's first row in the global batch: axis_index * n (int32 [])."""
    if axis_name is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis_name) * n


def global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sum of x over the devices of `axis_name` (psum); x itself when axis_name is None."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)
