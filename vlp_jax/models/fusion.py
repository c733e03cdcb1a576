"""Dual-stream fusion model: ALBEF (Li et al. 2021), and ViLBERT / LXMERT co-attention as an option.

    image  -> ViT                          -> tokens v [B, T, Wv]; ITC: u = norm(P_v v_cls)
    tokens -> text encoder (BERT layers 1..N, bidirectional) -> t [B, L, W]; ITC: w = norm(P_t t_cls)
    fusion = 'cross_attention' (ALBEF): BERT layers N+1..N+M, each self-attention over the text,
             cross-attention to v, MLP  (`Encoder(cross_attention_every=1)`)
             'coattention' (ViLBERT / LXMERT): M co-attention blocks in which text and image
             streams attend to each other (`vlp_jax.models.coattention`)
    heads: ITM Linear(W, 2) on the fused text CLS (or, `itm_pool='product'`, ViLBERT's
           elementwise product of the fused text and image CLS), MLM tied to the word embeddings.

The ITC temperature tau is learnable (0.07 at init; the method clamps it to [0.001, 0.5] as ALBEF
does) and stored as `log_temperature`: Adam moves a parameter by about the learning rate per
step, so the logarithm makes its steps relative. (ALBEF stores tau itself and trains at lr 1e-4;
at the toy learning rates used on CPU, ~1e-3, a direct tau hits the 0.001 floor within ~70 steps.)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models.coattention import CoAttentionEncoder
from vlp_jax.models.registry import (build_image_tower, model_dtype, register_model,
                                     stack_kwargs)
from vlp_jax.nn.attention import make_attention_mask
from vlp_jax.nn.collectives import l2_normalize
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import PredictionHead, itm_head, match_score, projection
from vlp_jax.nn.partitioning import logical
from vlp_jax.nn.transformer import Encoder

FUSIONS = ("cross_attention", "coattention")
ITM_POOLS = ("text", "product")


class FusionModel(nn.Module):
    """ALBEF-style model (see module docstring).

    Attributes:
      image_tower: module images [B, S, S, 3] -> (pooled [B, Wv], tokens [B, T, Wv]).
      vocab_size, width, text_depth, fusion_depth, num_heads, mlp_dim, context_length: text sizes.
      pad_id: padding id (padded text keys are masked everywhere).
      embed_dim: ITC projection size (ALBEF: 256).
      fusion: 'cross_attention' or 'coattention'.
      coattention_shared: LXMERT-style one cross-attention shared by both directions.
      itm_pool: 'text' (fused text CLS) or 'product' (fused text CLS * fused image CLS; needs
        the co-attention fusion and Wv == W).
      temperature_init: initial ITC temperature (stored as its logarithm).
      remat, remat_policy, scan_layers, attention_implementation, dropout_rate, deterministic:
        stack options of the text and fusion encoders (the image tower has its own copy).
    """

    image_tower: nn.Module
    vocab_size: int
    width: int
    text_depth: int
    fusion_depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    pad_id: int = 0
    embed_dim: int = 256
    fusion: str = "cross_attention"
    coattention_shared: bool = False
    itm_pool: str = "text"
    temperature_init: float = 0.07
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True

    def setup(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.itm_pool not in ITM_POOLS:
            raise ValueError(f"model.itm_pool must be one of {ITM_POOLS}, got {self.itm_pool!r}")
        if self.itm_pool == "product" and self.fusion != "coattention":
            raise ValueError("model.itm_pool='product' needs model.fusion='coattention' (the image "
                             "stream is only updated by co-attention)")
        stack = dict(remat=self.remat, dtype=self.dtype, remat_policy=self.remat_policy,
                     scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                     attention_implementation=self.attention_implementation)
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length,
                                          dtype=self.dtype)
        self.text_encoder = Encoder(self.text_depth, self.num_heads, self.mlp_dim, **stack)
        if self.fusion == "cross_attention":
            self.fusion_encoder = Encoder(self.fusion_depth, self.num_heads, self.mlp_dim,
                                          cross_attention_every=1, **stack)
        else:
            self.fusion_encoder = CoAttentionEncoder(
                self.fusion_depth, self.num_heads, self.mlp_dim, self.coattention_shared,
                deterministic=self.deterministic, **stack)
        self.image_proj = projection(self.embed_dim, use_bias=True, dtype=self.dtype)
        self.text_proj = projection(self.embed_dim, use_bias=True, dtype=self.dtype)
        self.log_temperature = self.param(
            "log_temperature",
            logical(nn.initializers.constant(math.log(self.temperature_init)), ()), ())
        self.itm_head = itm_head(self.dtype)
        self.mlm_head = PredictionHead(self.vocab_size, tied=True, bias_axis="vocab",
                                       dtype=self.dtype)

    # ---- unimodal encoders ------------------------------------------------------------------
    def image_features(self, images):
        """images [B, S, S, 3] -> (unit ITC embedding float32 [B, D], tokens [B, T, Wv])."""
        pooled, tokens = self.image_tower(images)
        return l2_normalize(self.image_proj(pooled)), tokens

    def text_features(self, tokens):
        """tokens int [B, L] -> (unit ITC embedding [B, D], tokens [B, L, W], valid [B, L])."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        valid = tokens != self.pad_id
        x = self.text_encoder(self.token_embed(tokens), mask=make_attention_mask(valid, valid),
                              deterministic=self.deterministic)
        return l2_normalize(self.text_proj(x[:, 0])), x, valid

    def encode_image(self, images):
        return self.image_features(images)[0]

    def encode_text(self, tokens):
        return self.text_features(tokens)[0]

    # ---- fusion and heads -------------------------------------------------------------------
    def fuse(self, image_tokens, text_tokens, text_valid):
        """Fusion encoder: -> (fused text [B, L, W], fused image [B, T, Wv] or None).

        With cross-attention only the text stream is updated (the image tokens are keys and
        values); co-attention updates both streams.
        """
        if self.fusion == "cross_attention":
            ctx_mask = make_attention_mask(text_valid, jnp.ones(image_tokens.shape[:2], bool))
            return self.fusion_encoder(text_tokens, make_attention_mask(text_valid, text_valid),
                                       image_tokens, ctx_mask,
                                       deterministic=self.deterministic), None
        return self.fusion_encoder(text_tokens, image_tokens, text_valid)

    def itm_logits(self, fused_text, fused_image=None):
        """[B, 2] logits (no match, match) from the fused CLS token(s)."""
        pooled = fused_text[:, 0]
        if self.itm_pool == "product":
            pooled = pooled * fused_image[:, 0]
        return self.itm_head(pooled)

    def mlm_logits(self, fused_text):
        """[B, L, W] -> float32 [B, L, V], tied to the word embeddings."""
        return self.mlm_head(fused_text, self.token_embed.embedding)

    def score_pairs(self, images, tokens):
        """ITM match score of aligned pairs: logit(match) - logit(no match), float32 [B]."""
        _, image_tokens = self.image_features(images)
        _, text_tokens, valid = self.text_features(tokens)
        return match_score(self.itm_logits(*self.fuse(image_tokens, text_tokens, valid)))

    def __call__(self, images, tokens):
        """Every output once (used for init): dict(image_emb, text_emb, itm_logits, mlm_logits,
        fused_text, temperature)."""
        u, image_tokens = self.image_features(images)
        w, text_tokens, valid = self.text_features(tokens)
        fused_text, fused_image = self.fuse(image_tokens, text_tokens, valid)
        return dict(image_emb=u, text_emb=w, fused_text=fused_text,
                    itm_logits=self.itm_logits(fused_text, fused_image),
                    mlm_logits=self.mlm_logits(fused_text),
                    temperature=jnp.exp(self.log_temperature.astype(jnp.float32)))


@register_model("albef")
def build_fusion_model(cfg, vocab: dict) -> FusionModel:
    """model.name='albef': image (an image tower config), text.{width, depth, fusion_depth,
    num_heads, mlp_dim, context_length}, embed_dim, fusion, coattention_shared, itm_pool,
    temperature_init, dtype and the stack options (remat, remat_policy, scan_layers,
    attention_implementation, dropout_rate)."""
    dtype, stack = model_dtype(cfg), stack_kwargs(cfg)
    text = cfg.text
    if text.get("fusion_depth", 0) < 1:
        raise ValueError(f"model.text.fusion_depth must be >= 1, got {text.get('fusion_depth')}")
    return FusionModel(
        image_tower=build_image_tower(cfg.image, dtype, **stack), vocab_size=vocab["vocab_size"],
        width=text.width, text_depth=text.depth, fusion_depth=text.fusion_depth,
        num_heads=text.num_heads, mlp_dim=text.get("mlp_dim", 4 * text.width),
        context_length=text.context_length, pad_id=vocab["pad_id"],
        embed_dim=cfg.get("embed_dim", 256), fusion=cfg.get("fusion", "cross_attention"),
        coattention_shared=cfg.get("coattention_shared", False),
        itm_pool=cfg.get("itm_pool", "text"),
        temperature_init=cfg.get("temperature_init", 0.07), dtype=dtype, **stack)
