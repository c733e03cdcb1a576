"""Pooling of token sequences into one vector per example."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.attention import MultiHeadAttention
from vlp_jax.nn.partitioning import layer_norm, logical
from vlp_jax.nn.transformer import MlpBlock


def first_token(x: jax.Array) -> jax.Array:
    """CLS pooling: [B, L, W] -> [B, W] (token 0)."""
    return x[:, 0]


def last_valid_token(x: jax.Array, valid: jax.Array) -> jax.Array:
    """EOT pooling: the last valid token of each row.

    x [B, L, W], valid bool [B, L] (a prefix of True, as `bos ... eos pad ...`) -> [B, W].
    With a causal text encoder this token (eos) has seen the whole caption (CLIP).
    """
    last = jnp.maximum(jnp.sum(valid, axis=-1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


def masked_mean(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean over valid tokens: [B, L, W] -> [B, W]."""
    if valid is None:
        return x.mean(axis=1)
    w = valid.astype(x.dtype)[..., None]
    return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP, as in SigLIP/big_vision): a learned probe query.

    Call: x [B, L, W] -> [B, W].
    """

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, width))
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, width)).astype(x.dtype)
        y = MultiHeadAttention(self.num_heads, self.dtype, self.implementation, name="attn")(probe, x)
        y = y + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm("ln", self.dtype)(y))
        return y[:, 0]


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (Yu et al. 2022, sec. 3.2): `num_queries` learned queries
    cross-attend to the tokens, then LayerNorm. x [B, T, W] -> [B, num_queries, W].
    (n = 1 gives the contrastive image embedding, n = 256 in CoCa the decoder's image tokens.)
    Params queries [n, W], attn/..., ln/{scale, bias}."""

    num_queries: int
    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        q = self.param("queries", logical(nn.initializers.normal(0.02), (None, "embed")),
                       (self.num_queries, width))
        q = jnp.broadcast_to(q.astype(x.dtype), (x.shape[0], self.num_queries, width))
        y = MultiHeadAttention(self.num_heads, self.dtype, self.implementation, name="attn")(
            q, layer_norm("ln_kv", self.dtype)(x))
        return layer_norm("ln", self.dtype)(y)
