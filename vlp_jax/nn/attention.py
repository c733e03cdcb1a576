"""Multi-head dot-product attention (self- or cross-), with logical axis annotations.

Implements Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V of Vaswani et al. (2017),
eq. 1, with h heads projected from and back to the model width.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import dense_init, zeros


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """bool [B, 1, Q, K] mask from validity vectors query_valid [B, Q] and key_valid [B, K]."""
    return (query_valid[:, None, :, None] & key_valid[:, None, None, :])


def causal_mask(length: int) -> jax.Array:
    """bool [1, 1, L, L] lower-triangular mask: position i attends to positions <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention.

    Attributes:
      num_heads: number of heads h; the per-head dim is width // h.
      dtype: compute dtype (parameters stay float32).

    Call:
      inputs_q: [B, Q, W]; inputs_kv: [B, K, W'] (defaults to inputs_q: self-attention).
      mask: optional bool broadcastable to [B, h, Q, K]; True = may attend.
      return_weights: also return the attention probabilities [B, h, Q, K] (float32).
    Returns:
      [B, Q, W] (and the weights if asked).
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, mask=None, return_weights=False):
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name, x):
            return nn.DenseGeneral(
                (self.num_heads, head_dim), dtype=self.dtype, name=name,
                kernel_init=dense_init(("embed", "heads", "kv")),
                bias_init=zeros(("heads", "kv")))(x)

        q = proj("query", inputs_q) / jnp.sqrt(head_dim).astype(self.dtype)
        k = proj("key", inputs_kv)
        v = proj("value", inputs_kv)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        out = nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.dtype, name="out",
            kernel_init=dense_init(("heads", "kv", "embed")),
            bias_init=zeros(("embed",)))(out)
        return (out, weights) if return_weights else out
