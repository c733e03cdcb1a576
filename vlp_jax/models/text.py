"""Text transformer encoder (CLIP-style causal, or BERT-style bidirectional), and with
`decode=True` an incremental causal decoder over the same parameters."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.nn.attention import causal_mask, make_attention_mask
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.pooling import first_token, last_valid_token, masked_mean
from vlp_jax.nn.transformer import Encoder

POOLS = ("eot", "cls", "mean")


class TextTransformer(nn.Module):
    """Token + position embedding (`TokenEmbedding`) + pre-LN transformer + pooling.

    Attributes:
      vocab_size, width, depth, num_heads, mlp_dim, context_length: sizes.
      causal: causal self-attention (CLIP, decoders) or bidirectional (BERT).
      pool: 'eot' (the last non-pad token, CLIP), 'cls' (token 0 = bos, BERT) or 'mean'.
      pad_id: the padding id; padded keys are masked out of attention.
      decode: incremental decoding (needs causal=True): each call feeds the next token(s),
        keys/values and the position counter live in the 'cache' collection. Create the
        cache with `init(rng, tokens[:, :1])` on the decode=True clone and pass it back with
        `mutable=['cache']`. Padding is not masked in this mode (decoded tokens are real).
      remat, remat_policy, scan_layers, attention_implementation, dropout_rate, deterministic:
        stack options.

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
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"TextTransformer.pool must be one of {POOLS}, got {self.pool!r}")
        if self.decode and not self.causal:
            raise ValueError("TextTransformer(decode=True) needs causal=True")
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length,
                                          dtype=self.dtype, decode=self.decode)
        self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                               dtype=self.dtype, remat_policy=self.remat_policy,
                               scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                               attention_implementation=self.attention_implementation,
                               decode=self.decode, max_decode_length=self.context_length)

    def __call__(self, tokens):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        valid = tokens != self.pad_id
        x = self.token_embed(tokens)
        if self.decode:
            mask = None                   # causality over absolute positions: the cache's
        else:
            mask = make_attention_mask(valid, valid)
            if self.causal:
                mask = mask & causal_mask(tokens.shape[1])
        x = self.encoder(x, mask=mask, deterministic=self.deterministic)
        if self.pool == "eot":
            pooled = last_valid_token(x, valid)
        elif self.pool == "cls":
            pooled = first_token(x)
        else:
            pooled = masked_mean(x, valid)
        return pooled, x, valid

    def embed_tokens(self, tokens):
        """Token embeddings only (for tied output layers): [B, L] -> [B, L, W]."""
        return self.token_embed.embed_tokens(tokens)

    def attend(self, x):
        """Logits against the tied token-embedding table: [..., W] -> [..., vocab]."""
        return self.token_embed.attend(x)


def build_text(cfg, vocab: dict, dtype=jnp.float32, remat=False, **stack) -> TextTransformer:
    """model.text: width, depth, num_heads, mlp_dim, context_length, causal, pool."""
    return TextTransformer(vocab_size=vocab["vocab_size"], width=cfg.width, depth=cfg.depth,
                           num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
                           context_length=cfg.context_length, causal=cfg.get("causal", True),
                           pool=cfg.get("pool", "eot"), pad_id=vocab["pad_id"], remat=remat,
                           dtype=dtype, **stack)
