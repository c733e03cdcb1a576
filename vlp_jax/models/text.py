"""Text transformer encoder (CLIP-style causal, or BERT-style bidirectional)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.nn.attention import causal_mask, make_attention_mask
from vlp_jax.nn.partitioning import logical
from vlp_jax.nn.patch_embed import PositionEmbedding
from vlp_jax.nn.pooling import first_token, last_valid_token, masked_mean
from vlp_jax.nn.transformer import Encoder

POOLS = ("eot", "cls", "mean")


class TextTransformer(nn.Module):
    """Token embedding + learned positions + pre-LN transformer + pooling.

    Attributes:
      vocab_size, width, depth, num_heads, mlp_dim, context_length: sizes.
      causal: causal self-attention (CLIP, decoders) or bidirectional (BERT).
      pool: 'eot' (the last non-pad token, CLIP), 'cls' (token 0 = bos, BERT) or 'mean'.
      pad_id: the padding id; padded keys are masked out of attention.

    Call: tokens int [B, L] laid out `bos ... eos pad ...` (L <= context_length).
    Returns: (pooled [B, width], tokens [B, L, width], valid bool [B, L]).
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    causal: bool = True
    pool: str = "eot"
    pad_id: int = 0
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"TextTransformer.pool must be one of {POOLS}, got {self.pool!r}")
        self.token_embed = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.pos_embed = PositionEmbedding(self.context_length)
        self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                               dtype=self.dtype)

    def __call__(self, tokens):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        valid = tokens != self.pad_id
        x = self.pos_embed(self.token_embed(tokens))
        mask = make_attention_mask(valid, valid)
        if self.causal:
            mask = mask & causal_mask(tokens.shape[1])
        x = self.encoder(x, mask=mask)
        if self.pool == "eot":
            pooled = last_valid_token(x, valid)
        elif self.pool == "cls":
            pooled = first_token(x)
        else:
            pooled = masked_mean(x, valid)
        return pooled, x, valid

    def embed_tokens(self, tokens):
        """Token embeddings only (for tied output layers): [B, L] -> [B, L, W]."""
        return self.token_embed(tokens)

    def attend(self, x):
        """Logits against the tied token-embedding table: [..., W] -> [..., vocab]."""
        return self.token_embed.attend(x)
