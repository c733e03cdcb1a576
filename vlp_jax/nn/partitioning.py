"""Logical axis names used to annotate every parameter, and initialiser helpers.

Parameters carry *logical* axis names (what the axis means) rather than mesh axes (where it
lives); `vlp_jax.parallel.sharding` maps logical names to mesh axes with a rule table chosen
by the experiment file. The names:

    embed   model width (d_model)          mlp     MLP hidden units
    heads   attention heads                kv      per-head feature dim
    vocab   token vocabulary               patch   flattened patch pixels (p*p*C)
    pos     position-embedding index       proj    joint embedding dim (projection heads)
    conv_*  convolution kernel axes        norm    LayerNorm scale/bias (same as embed)
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

from vlp_jax.nn.norm import LayerNorm

Initializer = Callable[..., jax.Array]


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """Wraps an initialiser so its parameter is annotated with logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


def dense_init(names: Sequence[str | None], stddev: float | None = None) -> Initializer:
    """Kernel initialiser: truncated-normal(stddev) or Xavier-uniform, annotated with `names`."""
    base = (nn.initializers.truncated_normal(stddev) if stddev is not None
            else nn.initializers.xavier_uniform())
    return logical(base, names)


def zeros(names: Sequence[str | None]) -> Initializer:
    return logical(nn.initializers.zeros_init(), names)


def ones(names: Sequence[str | None]) -> Initializer:
    return logical(nn.initializers.ones_init(), names)


def layer_norm(name: str | None = None, dtype=None) -> LayerNorm:
    """LayerNorm (eps 1e-6, `vlp_jax.nn.norm`) whose scale and bias are annotated along
    `embed`."""
    return LayerNorm(
        epsilon=1e-6, dtype=dtype, name=name,
        scale_init=ones(("embed",)), bias_init=zeros(("embed",)))
