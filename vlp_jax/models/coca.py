"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

    image tokens  z = ViT(images)                                 [B, T, Wv]
    u = l2(P_v AttnPool_1(z))                                     contrastive image embedding
    c = AttnPool_N(z)                                             [B, N, Wv]  decoder's image tokens
    unimodal text decoder (first layers, causal, NO cross-attention) over
        [E(w_0 .. w_{L-1}) + P ; cls + P_L]  ->  h                [B, L + 1, W]
    v = l2(P_t h_cls)                                             contrastive text embedding
    multimodal decoder (later layers, causal self-attention, cross-attention to c) over h[:, :L]
    logits_t = LMHead(.)  predicts w_{t+1}

The loss is the method's: ITC(u, v) gathered over the devices + lambda * captioning CE (CoCa:
lambda_Con = 1, lambda_Cap = 2). The unimodal layers never see the image: the image enters only
through the multimodal decoder's cross-attention. The learnable logit scale t = log(1 / tau)
(init ln(1 / 0.07)) is clamped after each step as CLIP's.

Deviations: the LM head is BERT's transform tied to the word embeddings (CoCa's is an untied
Dense), the same head as GIT and the encoder-decoder here; no label smoothing by default
(CoCa uses 0.1: `method.label_smoothing`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models.generation import shifted_lm_outputs
from vlp_jax.models.git import image_token_count
from vlp_jax.models.registry import build_image_tower, model_dtype, register_model, stack_kwargs
from vlp_jax.nn.attention import causal_mask, make_attention_mask
from vlp_jax.nn.collectives import l2_normalize
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import PredictionHead, projection
from vlp_jax.nn.partitioning import layer_norm, logical
from vlp_jax.nn.pooling import AttentionalPooler
from vlp_jax.nn.transformer import Encoder


class CoCa(nn.Module):
    """See the module docstring.

    Attributes: image_tower (ViT); vocab_size, width, unimodal_depth, multimodal_depth,
    num_heads, mlp_dim, context_length, embed_dim (contrastive), num_queries (N, the
    decoder's image tokens; CoCa 256), logit_scale_init, pad_id; stack options; decode.
    Call: images [B, S, S, 3], tokens int [B, L] -> dict(image_emb, text_emb [B, D] unit-norm,
    lm_logits [B, L-1, V], lm_targets, lm_weights).
    """

    image_tower: nn.Module
    vocab_size: int
    width: int
    unimodal_depth: int
    multimodal_depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    embed_dim: int
    num_queries: int = 16
    logit_scale_init: float = math.log(1 / 0.07)
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
        image_token_count(self.image_tower)
        stack = dict(remat=self.remat, dtype=self.dtype, remat_policy=self.remat_policy,
                     scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                     attention_implementation=self.attention_implementation,
                     decode=self.decode, max_decode_length=self.context_length)
        heads = getattr(self.image_tower, "num_heads", self.num_heads)
        impl = self.attention_implementation
        self.contrastive_pool = AttentionalPooler(1, heads, self.dtype, impl)
        self.caption_pool = AttentionalPooler(self.num_queries, heads, self.dtype, impl)
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length + 1,
                                          dtype=self.dtype, decode=self.decode)
        self.cls = self.param("cls", logical(nn.initializers.normal(0.02), ("embed",)),
                              (self.width,))
        self.unimodal = Encoder(self.unimodal_depth, self.num_heads, self.mlp_dim, **stack)
        self.multimodal = Encoder(self.multimodal_depth, self.num_heads, self.mlp_dim,
                                  cross_attention_every=1, **stack)
        self.image_proj = projection(self.embed_dim, dtype=self.dtype)
        self.text_proj = projection(self.embed_dim, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale",
                                      logical(nn.initializers.constant(self.logit_scale_init),
                                              ()), ())
        self.lm_head = PredictionHead(self.vocab_size, tied=True, bias_axis="vocab",
                                      dtype=self.dtype)

    # ---- towers -----------------------------------------------------------------------------
    def image_features(self, images):
        """images -> (unit contrastive embedding [B, D], decoder image tokens [B, N, Wv])."""
        z = self.image_tower(images)[1]
        u = l2_normalize(self.image_proj(self.contrastive_pool(z)[:, 0]))
        return u, self.caption_pool(z)

    def text_features(self, tokens):
        """tokens [B, L] -> (unit contrastive embedding [B, D], unimodal outputs [B, L, W],
        valid [B, L]). The cls token sits after the last position and sees every real token."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        b, length = tokens.shape
        valid = tokens != self.pad_id
        cls = (self.cls + self.token_embed.pos_embedding[length]).astype(self.dtype)
        x = jnp.concatenate([self.token_embed(tokens),
                             jnp.broadcast_to(cls, (b, 1, self.width))], axis=1)
        keys = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
        mask = causal_mask(length + 1) & keys[:, None, None, :]
        h = self.unimodal(x, mask=mask, deterministic=self.deterministic)
        return l2_normalize(self.text_proj(h[:, length])), h[:, :length], valid

    def encode_image(self, images):
        return self.image_features(images)[0]

    def encode_text(self, tokens):
        return self.text_features(tokens)[0]

    def _caption_logits(self, h, valid, context, mask=None):
        ctx_mask = None if valid is None else make_attention_mask(
            valid, jnp.ones(context.shape[:2], bool))
        y = self.multimodal(h, mask=mask, context=context, context_mask=ctx_mask,
                            deterministic=self.deterministic)
        return self.lm_head(y, self.token_embed.embedding)

    def __call__(self, images, tokens):
        u, context = self.image_features(images)
        v, h, valid = self.text_features(tokens)
        mask = causal_mask(tokens.shape[1]) & valid[:, None, None, :]
        logits = self._caption_logits(h, valid, context, mask)
        return dict(image_emb=u, text_emb=v,
                    **shifted_lm_outputs(logits, tokens, self.pad_id))

    # ---- decoding ---------------------------------------------------------------------------
    def prefill(self, images):
        """(decode=True) -> {'context': the decoder's image tokens [B, N, Wv]}."""
        return {"context": self.image_features(images)[1]}

    def step(self, context, tokens):
        """(decode=True) tokens [B, 1] -> next-token logits [B, 1, V] (the cls is not fed)."""
        h = self.unimodal(self.token_embed(tokens), deterministic=True)
        return self._caption_logits(h, None, context["context"])


@register_model("coca")
def build_coca(cfg, vocab: dict) -> CoCa:
    """model (name='coca'): image (a ViT), embed_dim, num_queries, logit_scale_init, text:
    width, unimodal_depth, multimodal_depth, num_heads, mlp_dim, context_length."""
    dtype, stack, text = model_dtype(cfg), stack_kwargs(cfg), cfg.text
    return CoCa(image_tower=build_image_tower(cfg.image, dtype=dtype, **stack),
                vocab_size=vocab["vocab_size"], width=text.width,
                unimodal_depth=text.unimodal_depth, multimodal_depth=text.multimodal_depth,
                num_heads=text.num_heads, mlp_dim=text.get("mlp_dim", 4 * text.width),
                context_length=text.context_length, embed_dim=cfg.embed_dim,
                num_queries=cfg.get("num_queries", 16),
                logit_scale_init=cfg.get("logit_scale_init", math.log(1 / 0.07)),
                pad_id=vocab["pad_id"], dtype=dtype, **stack)
