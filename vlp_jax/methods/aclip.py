"""A-CLIP, attentive mask CLIP (Yang et al. 2023): keep the image tokens the EMA teacher attends
to, encode only those with the student, and add self-supervised terms between views.

What is implemented (after the paper and its public code, re-derived here):
  1. An EMA teacher (aux['teacher'], momentum `ema_momentum`) encodes the *full* image.
  2. Each patch gets a relevance score from the teacher (`score`):
       'attention' (the paper): the attention the class token pays to the patch, averaged over
         heads and over all layers, a_n = 1/(L h) sum_{l, h} softmax(q_cls k^T)_n. The class
         token is what CLIP aligns with the caption, so these are the text-relevant patches.
         (With no class token, pool='gap'/'map': the attention each patch receives, averaged
         over all queries.)
       'text': the teacher's caption embedding against each patch token projected into the joint
         space, softmax_n(s <P_img tok_n, v>) with s the teacher's logit scale; the caption
         itself picks the patches.
       'attention_text': the product of the two distributions, renormalised.
  3. The student encodes the `keep_ratio` highest-scored patches (`ViT(keep_ids=...)`; A-CLIP
     keeps 50%) and trains the CLIP loss on them; evaluation encodes whole images.
  4. Optional terms (A-CLIP's full model uses both with two augmented views):
       views=2 (needs data.two_views=True): both views are masked attentively, the CLIP loss is
         averaged over them, and `ssl_weight` x NT-Xent (SimCLR, tau `ssl_temperature`) ties the
         two views' pooled outputs through a projection MLP;
       `distill_weight` x online-to-EMA distillation (BYOL-style): predictor(projector(student
         pooled of the masked view)) against the EMA projector of the teacher's pooled output of
         the full view, A-CLIP's loss 2 * mean ||n(p) - n(z)||^2 = 2 * mean(2 - 2 cos)
         = 4 * mean(1 - cos) (`objectives.contrastive.byol_loss`), averaged over the views.

Objectives (`vlp_jax.objectives`): `itc` (the CLIP loss averaged over the masked views), `ssl`
(weight ssl_weight, views=2 only), `distill` (weight distill_weight); the heads `aclip_ssl`,
`aclip_proj`, `aclip_pred` are Flax modules beside the dual encoder (`methods.heads`); the EMA
teacher averages the dual encoder and `aclip_proj` (the predictor is online-only).

config.method fields: keep_ratio, score, ema_momentum, views, ssl_weight, ssl_temperature,
ssl_mlp_dim, ssl_emb_dim, distill_weight.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.ssl_common import (DUAL_ENCODER_KEYS, ProjectionMLP, image_features,
                                        patch_count, patch_tokens, pooled_example,
                                        project_patch_tokens, require_accumulation_none,
                                        require_key)
from vlp_jax.objectives.contrastive import (MultiViewContrastiveObjective,
                                            OnlineToEmaDistillObjective, SimclrObjective)
from vlp_jax.objectives.core import Term
from vlp_jax.objectives.teacher import EmaTeacher
from vlp_jax.nn.collectives import l2_normalize
from vlp_jax.methods.registry import register_method

SCORES = ("attention", "text", "attention_text")


def capture_block_attention(model: nn.Module, params, images):
    """Image-tower forward that also returns every encoder block's self-attention.

    Returns ((embedding [B, D], pooled [B, W], tokens [B, T, W]), float32 [L, B, h, T, T]).
    The weights come from the ViT's `return_weights=True` path (the explicit softmax; it works
    with `scan_layers` and `remat`); an image tower without that path (ResNet) is an error.
    """
    def fn(m, x):
        try:
            pooled, tokens, weights = m.image_tower(x, return_weights=True)
        except TypeError as e:
            raise ValueError("A-CLIP's attention scores need an image tower with attention "
                             f"weights (model.image.type='vit'): {e}") from e
        return (l2_normalize(m.image_proj(pooled)), pooled, tokens), weights
    return model.apply({"params": params}, images, method=fn)


def attention_scores(weights, num_patches: int) -> jax.Array:
    """Per-patch score [B, N] from block attentions [L, B, h, T, T] (an array or a list of L
    [B, h, T, T]; see module docstring)."""
    a = jnp.mean(jnp.asarray(weights), axis=(0, 2))               # [B, T, T]
    prefix = a.shape[-1] - num_patches
    if prefix == 1:
        return a[:, 0, 1:]
    return jnp.mean(a[:, :, prefix:], axis=1)


def text_scores(patch_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
    """softmax_n(scale * <p_n, v>): patch_emb unit [B, N, D], text_emb unit [B, D] -> [B, N]."""
    return jax.nn.softmax(scale * jnp.einsum("bnd,bd->bn", patch_emb, text_emb), axis=-1)


def attentive_keep_ids(scores: jax.Array, keep: int) -> jax.Array:
    """Indices of the `keep` highest scores per row, in raster order: [B, N] -> int32 [B, keep]."""
    _, ids = jax.lax.top_k(scores, keep)
    return jnp.sort(ids, axis=-1).astype(jnp.int32)


@register_method("aclip")
@dataclasses.dataclass
class AClipMethod(ContrastiveMethod):

    def setup(self):
        cfg = self.config
        require_accumulation_none(cfg, "A-CLIP")
        if cfg.get("mask_ratio", 0.0):
            raise ValueError("A-CLIP chooses patches itself: set method.keep_ratio, not "
                             "method.mask_ratio (random FLIP masking)")
        if cfg.get("score", "attention") not in SCORES:
            raise ValueError(f"method.score {cfg.score!r} is unknown; valid: {SCORES}")
        if cfg.get("views", 1) not in (1, 2):
            raise ValueError(f"method.views must be 1 or 2, got {cfg.views}")
        ratio = cfg.get("keep_ratio", 0.5)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"method.keep_ratio must be in (0, 1], got {ratio}")
        self._num_patches = patch_count(self.model)
        self._keep = max(1, int(round(self._num_patches * ratio)))
        self._ssl_w = cfg.get("ssl_weight", 0.0) if cfg.get("views", 1) == 2 else 0.0
        self._distill_w = cfg.get("distill_weight", 0.0)

    def heads(self):
        mlp, emb = self.config.get("ssl_mlp_dim", 256), self.config.get("ssl_emb_dim", 64)
        heads = []
        if self._ssl_w:
            heads.append(("aclip_ssl", ProjectionMLP(mlp, emb), pooled_example))
        if self._distill_w:
            heads.append(("aclip_proj", ProjectionMLP(mlp, emb, num_layers=2), pooled_example))
            heads.append(("aclip_pred", ProjectionMLP(mlp, emb, num_layers=2),
                          lambda base, images, tokens: (jnp.zeros((1, emb)),)))
        return tuple(heads)

    def teacher(self):
        extra = ("aclip_proj",) if self._distill_w else ()
        return EmaTeacher(float(self.config.get("ema_momentum", 0.99)),
                          include=DUAL_ENCODER_KEYS + extra)

    def terms(self):
        itc = MultiViewContrastiveObjective(self.mesh, self.config.get("loss", "softmax"))
        terms = [Term(itc)]
        if self._ssl_w:
            ssl = SimclrObjective(self.mesh, self.apply_head, "aclip_ssl",
                                  self.config.get("ssl_temperature", 0.1))
            terms.append(Term(ssl, weight=float(self._ssl_w)))
        if self._distill_w:
            distill = OnlineToEmaDistillObjective(self.apply_head, "aclip_proj", "aclip_pred")
            terms.append(Term(distill, weight=float(self._distill_w)))
        return terms

    def teacher_view(self, teacher, images, text):
        """Scores [B, N] of the full view and the teacher's pooled output [B, W]."""
        (_, pooled, tokens), weights = capture_block_attention(self.model, teacher,
                                                               images)
        kind = self.config.get("score", "attention")
        scores = attention_scores(weights, self._num_patches)
        if kind != "attention":
            patches = project_patch_tokens(self.model, teacher,
                                           patch_tokens(tokens, self._num_patches))
            v = self.model.apply({"params": teacher}, text, method="encode_text")
            scale = jnp.exp(teacher["logit_scale"].astype(jnp.float32))
            by_text = text_scores(patches, v, scale)
            if kind == "text":
                scores = by_text
            else:
                scores = scores / jnp.sum(scores, -1, keepdims=True) * by_text
                scores = scores / jnp.sum(scores, -1, keepdims=True)
        return jax.lax.stop_gradient(scores), jax.lax.stop_gradient(pooled)

    def keep_ids_for(self, teacher, images, text):
        scores, pooled = self.teacher_view(teacher, images, text)
        return attentive_keep_ids(scores, self._keep), pooled

    def views(self, batch):
        views = ["image"] + (["image2"] if self.config.get("views", 1) == 2 else [])
        for key in views[1:]:
            require_key(batch, key, "A-CLIP views=2", "data.two_views=True")
        return views

    def forward(self, params, aux, batch, rng, masked=True):
        """Per view: the teacher's keep ids [B, K] of the full image and pooled output [B, W],
        the student's embedding [B, D] and pooled output [B, W] of the kept patches; the
        caption's embedding [B, D] once."""
        teacher = jax.lax.stop_gradient(aux["teacher"])
        v = self.model.apply({"params": params}, batch["text"], method="encode_text")
        out = dict(image_embs=[], text_emb=v, pooled=[], teacher_pooled=[], keep_ids=[])
        for key in self.views(batch):
            ids, p_t = self.keep_ids_for(teacher, batch[key], batch["text"])
            u, p_s, _ = image_features(self.model, params, batch[key], ids if masked else None)
            out["keep_ids"].append(ids)
            out["image_embs"].append(u)
            out["pooled"].append(p_s)
            out["teacher_pooled"].append(p_t)
        return out
