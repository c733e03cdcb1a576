"""Token embedding: the one text/token input layer of every model.

    x_t = E[w_t] + P[t] (+ T[type_t])        E [V, W] token table, P [max_length, W] learned
                                             positions, T [num_types, W] optional type/segment

(BERT's embeddings without their LayerNorm: the pre-LN blocks normalise their inputs.) The
token table doubles as the read-out of tied MLM / LM heads (`attend`).

With `decode=True` the position of each call's first token comes from a counter in the 'cache'
collection (`position`), advanced by the number of tokens fed, so a step that feeds one token
gets the right position (incremental decoding with `MultiHeadAttention(decode=True)`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import logical


class TokenEmbedding(nn.Module):
    """Token + learned position (+ type) embedding.

    Attributes:
      vocab_size, width: the table E [vocab_size, width] (param `embedding`).
      max_length: rows of the position table P (param `pos_embedding` [max_length, width]).
      num_types: rows of the type table T (param `type_embedding`); 0 = none.
      decode: positions continue from the 'cache' counter (see module docstring).
    Call: tokens int [B, L], type_ids optional int (scalar or [B, L]) -> [B, L, width].
    """

    vocab_size: int
    width: int
    max_length: int
    num_types: int = 0
    dtype: Any = jnp.float32
    decode: bool = False
    stddev: float = 0.02

    def setup(self):
        init = nn.initializers.normal(self.stddev)
        self.embedding = self.param("embedding", logical(init, ("vocab", "embed")),
                                    (self.vocab_size, self.width))
        self.pos_embedding = self.param("pos_embedding", logical(init, ("pos", "embed")),
                                        (self.max_length, self.width))
        if self.num_types:
            self.type_embedding = self.param("type_embedding", logical(init, (None, "embed")),
                                             (self.num_types, self.width))
        if self.decode:
            self.cache_ready = self.has_variable("cache", "position")   # False during init
            self.position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))

    def _positions(self, length: int) -> jax.Array:
        """[L, W] position rows for this call's tokens."""
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        if not self.decode:
            return self.pos_embedding[:length]
        start = self.position.value
        if self.cache_ready:
            self.position.value = start + length
        return jax.lax.dynamic_slice_in_dim(self.pos_embedding, start, length, axis=0)

    def types(self, type_ids) -> jax.Array:
        """Rows of the type table: type_ids int (any shape) -> [..., width]."""
        if not self.num_types:
            raise ValueError("TokenEmbedding(num_types=0) has no type embedding")
        return jnp.take(self.type_embedding, jnp.asarray(type_ids, jnp.int32), axis=0
                        ).astype(self.dtype)

    def __call__(self, tokens, type_ids=None):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        x = x + self._positions(tokens.shape[1]).astype(self.dtype)
        if type_ids is not None:
            x = x + self.types(type_ids)       # [W] (scalar id) or [B, L, W]: broadcasts
        return x

    def embed_tokens(self, tokens):
        """Token rows only, no positions: [B, L] -> [B, L, W]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        """Logits against the token table (tied read-out): [..., W] -> [..., V]."""
        return jnp.einsum("...w,vw->...v", x, self.embedding.astype(x.dtype))
