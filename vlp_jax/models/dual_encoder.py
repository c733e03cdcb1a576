"""Two-tower (dual encoder) image-text model: CLIP, ALIGN, SigLIP, LiT, FLIP, ...

image -> image tower -> pooled -> linear projection -> L2-normalise  = u_i
text  -> text tower  -> pooled -> linear projection -> L2-normalise  = v_j
The contrastive losses score s_ij = exp(t) * <u_i, v_j> (+ b for SigLIP), t = `logit_scale`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models.registry import (build_image_tower, model_dtype, register_model,
                                     stack_kwargs)
from vlp_jax.models.text import build_text
from vlp_jax.nn.collectives import l2_normalize
from vlp_jax.nn.heads import projection
from vlp_jax.nn.partitioning import logical

__all__ = ["DualEncoder", "build_dual_encoder", "l2_normalize"]   # l2_normalize: old import site


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
        self.image_proj = projection(self.embed_dim)
        self.text_proj = projection(self.embed_dim)
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


@register_model("dual_encoder")
def build_dual_encoder(cfg, vocab: dict) -> DualEncoder:
    """model.name='dual_encoder': image (a tower config), text, embed_dim, logit_scale_init,
    logit_bias_init, dtype and the stack options (remat, remat_policy, scan_layers,
    attention_implementation, dropout_rate) for both towers."""
    dtype, stack = model_dtype(cfg), stack_kwargs(cfg)
    return DualEncoder(image_tower=build_image_tower(cfg.image, dtype, **stack),
                       text_tower=build_text(cfg.text, vocab, dtype, **stack),
                       embed_dim=cfg.embed_dim,
                       logit_scale_init=cfg.get("logit_scale_init", 2.6592600369262695),
                       logit_bias_init=cfg.get("logit_bias_init", None))
