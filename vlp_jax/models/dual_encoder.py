"""Two-tower (dual encoder) image-text model: CLIP, ALIGN, SigLIP, LiT, FLIP, ...

image -> image tower -> pooled -> linear projection -> L2-normalise  = u_i
text  -> text tower  -> pooled -> linear projection -> L2-normalise  = v_j
The contrastive losses score s_ij = exp(t) * <u_i, v_j> (+ b for SigLIP), t = `logit_scale`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import dense_init, logical


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| along the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class DualEncoder(nn.Module):
    """Image and text towers with projection heads and a learnable temperature.

    Attributes:
      image_tower: module mapping images [B, H, W, 3] (and `keep_ids`) to (pooled, tokens).
      text_tower: module mapping tokens [B, L] to (pooled, tokens, valid).
      embed_dim: joint embedding size D.
      logit_scale_init: initial t, with exp(t) the inverse temperature (CLIP: log(1/0.07)).
      logit_bias_init: initial b for sigmoid losses (SigLIP: -10); None = no bias parameter.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    embed_dim: int
    logit_scale_init: float = 2.6592600369262695  # log(1 / 0.07)
    logit_bias_init: float | None = None

    def setup(self):
        self.image_proj = nn.Dense(self.embed_dim, use_bias=False,
                                   kernel_init=dense_init(("embed", "proj")))
        self.text_proj = nn.Dense(self.embed_dim, use_bias=False,
                                  kernel_init=dense_init(("embed", "proj")))
        self.logit_scale = self.param(
            "logit_scale", logical(nn.initializers.constant(self.logit_scale_init), ()), ())
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", logical(nn.initializers.constant(self.logit_bias_init), ()), ())

    def encode_image(self, images, keep_ids=None):
        """images [B, H, W, 3] -> unit-norm embeddings float32 [B, D]."""
        pooled, _ = self.image_tower(images, keep_ids=keep_ids)
        return l2_normalize(self.image_proj(pooled))

    def encode_text(self, tokens):
        """tokens int [B, L] -> unit-norm embeddings float32 [B, D]."""
        pooled, _, _ = self.text_tower(tokens)
        return l2_normalize(self.text_proj(pooled))

    def __call__(self, images, tokens, keep_ids=None):
        """Returns dict(image_emb [B, D], text_emb [B, D], logit_scale [], logit_bias [] or absent)."""
        out = dict(image_emb=self.encode_image(images, keep_ids),
                   text_emb=self.encode_text(tokens),
                   logit_scale=self.logit_scale.astype(jnp.float32))
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias.astype(jnp.float32)
        return out
