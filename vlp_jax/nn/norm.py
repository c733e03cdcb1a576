"""LayerNorm with a hand-written backward pass.

    y = (x - mu) * r * scale + bias,  mu = mean(x),  r = 1 / sqrt(mean((x - mu)^2) + eps)

over the last axis (Ba, Kiros & Hinton 2016, eq. 4). The forward pass is flax's `nn.LayerNorm`
(statistics in float32; the variance is taken in two passes, mean((x - mu)^2), where flax's
default takes mean(x^2) - mu^2: the same function, a little more accurate in float32). The
backward pass is the closed form, with xh = (x - mu) r and g = dy * scale:

    dx = r * (g - mean(g) - xh * mean(g * xh)),  dscale = sum(dy * xh),  dbias = sum(dy)

It keeps only x and the per-row mu and r for the backward pass, and XLA fuses each line into
one loop. On XLA:CPU it made the CLIP train step of `benchmarks/train_throughput.py` (`main` config)
4.6% faster (median of interleaved repeats; benchmarks/README.md). Forward-mode
differentiation (`jax.jvp`) is not defined for it, as for any `jax.custom_vjp` function.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                  out_dtype: Any) -> jax.Array:
    """LayerNorm over the last axis: x [..., W], scale, bias [W] -> [..., W] in `out_dtype`."""
    return _forward(x, scale, bias, eps, out_dtype)[0]


def _forward(x, scale, bias, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    xc = x32 - mu
    r = jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps)
    y = xc * r * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(out_dtype), (x, mu, r, scale, bias)


def _backward(eps, out_dtype, residuals, dy):
    del eps, out_dtype
    x, mu, r, scale, bias = residuals
    dy32 = dy.astype(jnp.float32)
    xh = (x.astype(jnp.float32) - mu) * r
    g = dy32 * scale.astype(jnp.float32)
    dx = r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return (dx.astype(x.dtype), (dy32 * xh).sum(rows).astype(scale.dtype),
            dy32.sum(rows).astype(bias.dtype))


layer_norm_fn.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with parameters `scale` and `bias` [W] (flax's names).

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype (None: the promotion of the input's and the parameters' dtypes, as
        flax's LayerNorm); the statistics are float32 whatever it is.
      param_dtype: dtype of scale and bias.
      scale_init, bias_init: their initialisers.
    Call: x [..., W] -> [..., W].
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones_init()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", self.scale_init, (width,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (width,), self.param_dtype)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return layer_norm_fn(x, scale, bias, self.epsilon, jnp.dtype(out_dtype))
