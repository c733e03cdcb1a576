"""Single-stream vision-language transformer: ViLT, and VisualBERT / UNITER / VL-BERT as configs.

One transformer reads the concatenation [text tokens ; image tokens] (Kim et al. 2021, ViLT):

    text  = TokEmb(w) + TextPos + Type[0]                           [B, L, W]
    image = [cls_img ; PatchProj(patchify(x))] + ImagePos + Type[1]  [B, 1 + N, W]
    h     = PreLNTransformer([text ; image], padded text keys masked)
    pooled = tanh(Dense(h[:, 0]))            (the text CLS = bos token, BERT's pooler)

Heads (the objectives live in `vlp_jax.losses`, the recipes in `vlp_jax.methods.vilt`):
  ITM     Dense(2) on `pooled`                         (match / no match)
  MLM     transform -> logits tied to the word embeddings + bias  (BERT)
  MRFR    transform -> regression of the masked patch's pixels, *tied to the patch projection*:
          pred = t(h) @ K^T + b where K [p*p*3, W] is the PatchEmbed kernel (UNITER ties its
          feature-regression head to the region-feature embedding the same way)
  MRC     transform -> Dense(K) classes of a masked patch (K = `num_mrc_classes`; 0 = no head)

Variants are configurations, not copies: `image_cls` (ViLT's extra image class token; VisualBERT
/ UNITER have none), `type_embeddings` (modality-type / segment embeddings), and the objectives
and whole-word masking chosen in the method config (see experiments/vilt_shapes.py). Patches
stand in for detector regions, so UNITER's region features are patch pixels.

Masked region modelling: `patch_mask` bool [B, N] zeroes the chosen patches *before* the
projection (UNITER zeroes masked region features), so a masked patch enters as the projection's
bias plus its position.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.registry import model_dtype, register_model, stack_kwargs
from vlp_jax.nn.attention import make_attention_mask
from vlp_jax.nn.collectives import l2_normalize
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import HeadTransform, Pooler, PredictionHead, itm_head, match_score
from vlp_jax.nn.partitioning import logical
from vlp_jax.nn.patch_embed import PatchEmbed, PositionEmbedding
from vlp_jax.nn.pooling import masked_mean
from vlp_jax.nn.transformer import Encoder

__all__ = ["HeadTransform", "Pooler", "SingleStreamTransformer", "build_single_stream",
           "itm_head", "match_score", "patch_mask_to_pixels"]   # heads: old import sites


def patch_mask_to_pixels(patch_mask: jax.Array, grid: int, patch_size: int) -> jax.Array:
    """bool [B, N] (raster order, N = grid^2) -> bool [B, grid*p, grid*p, 1] pixel mask."""
    m = patch_mask.reshape(patch_mask.shape[0], grid, 1, grid, 1)
    m = jnp.broadcast_to(m, (m.shape[0], grid, patch_size, grid, patch_size))
    return m.reshape(m.shape[0], grid * patch_size, grid * patch_size, 1)


class SingleStreamTransformer(nn.Module):
    """ViLT-style single-stream encoder with ITM, MLM, MRFR and MRC heads.

    Attributes:
      vocab_size, width, depth, num_heads, mlp_dim, context_length: text/transformer sizes.
      image_size, patch_size: the square image side and the patch side (N = (S/p)^2 patches).
      pad_id: padding id (padded text keys are masked out of attention).
      image_cls: prepend a learned image class token (ViLT).
      type_embeddings: add a modality-type embedding (0 = text, 1 = image).
      num_mrc_classes: classes of the MRC head (0 = no MRC head).
      remat, remat_policy, scan_layers, attention_implementation, dropout_rate, deterministic:
        stack options.

    Call (`__call__`, also used for init; touches every head):
      images float [B, S, S, 3], tokens int [B, L], patch_mask optional bool [B, N].
    Returns dict(text [B, L, W], image [B, T, W] (T = N + image_cls), text_valid bool [B, L],
      pooled [B, W], itm_logits [B, 2], mlm_logits [B, L, V], mrfr [B, N, p*p*3]
      (, mrc_logits [B, N, K])).
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    image_size: int
    patch_size: int
    pad_id: int = 0
    image_cls: bool = True
    type_embeddings: bool = True
    num_mrc_classes: int = 0
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image.image_size={self.image_size} is not a multiple of "
                             f"model.image.patch_size={self.patch_size}")
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length,
                                          num_types=2 if self.type_embeddings else 0,
                                          dtype=self.dtype)
        self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype)
        self.image_pos = PositionEmbedding(self.num_patches + int(self.image_cls))
        if self.image_cls:
            self.cls = self.param("image_cls", logical(nn.initializers.zeros_init(),
                                                       (None, None, "embed")), (1, 1, self.width))
        self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                               dtype=self.dtype, remat_policy=self.remat_policy,
                               scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                               attention_implementation=self.attention_implementation)
        self.pooler = Pooler(self.dtype)
        self.itm_head = itm_head(self.dtype)
        self.mlm_head = PredictionHead(self.vocab_size, tied=True, bias_axis="vocab",
                                       dtype=self.dtype)
        self.mrfr_head = PredictionHead(self.patch_size * self.patch_size * 3, tied=True,
                                        bias_axis="patch", dtype=self.dtype)
        if self.num_mrc_classes:
            self.mrc_head = PredictionHead(self.num_mrc_classes, tied=False, dtype=self.dtype)

    # ---- embeddings -------------------------------------------------------------------------
    def _encode(self, x, mask=None):
        return self.encoder(x, mask=mask, deterministic=self.deterministic)

    def embed_text(self, tokens):
        """tokens int [B, L] -> (embeddings [B, L, W], valid bool [B, L])."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        valid = tokens != self.pad_id
        return self.token_embed(tokens, 0 if self.type_embeddings else None), valid

    def embed_image(self, images, patch_mask=None):
        """images [B, S, S, 3] (patches with patch_mask True zeroed) -> [B, T, W]."""
        images = images.astype(self.dtype)
        if patch_mask is not None:
            pixels = patch_mask_to_pixels(patch_mask, self.grid, self.patch_size)
            images = jnp.where(pixels, jnp.zeros((), images.dtype), images)
        x = self.patch_embed(images)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"model built for {self.image_size}px images got {images.shape[1:3]}")
        if self.image_cls:
            cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, self.width)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        x = self.image_pos(x)
        return x + self.token_embed.types(1).astype(x.dtype) if self.type_embeddings else x

    # ---- encoders ---------------------------------------------------------------------------
    def encode(self, images, tokens, patch_mask=None):
        """Joint encoding: dict(text [B, L, W], image [B, T, W], text_valid, pooled [B, W])."""
        t, valid = self.embed_text(tokens)
        v = self.embed_image(images, patch_mask)
        key_valid = jnp.concatenate([valid, jnp.ones(v.shape[:2], bool)], axis=1)
        h = self._encode(jnp.concatenate([t, v], axis=1), make_attention_mask(key_valid, key_valid))
        text, image = h[:, :t.shape[1]], h[:, t.shape[1]:]
        return dict(text=text, image=image, text_valid=valid, pooled=self.pooler(h))

    def image_patches(self, image_tokens):
        """Drops the image class token: [B, T, W] -> [B, N, W]."""
        return image_tokens[:, int(self.image_cls):]

    def encode_text(self, tokens):
        """Unimodal first-stage embedding: the transformer on the caption alone, mean-pooled
        over valid tokens and L2-normalised -> float32 [B, W]. (ViLT has no ITC: this ranking
        is only as good as the shared encoder's unimodal features; retrieval re-ranks it.)"""
        t, valid = self.embed_text(tokens)
        h = self._encode(t, make_attention_mask(valid, valid))
        return l2_normalize(masked_mean(h, valid))

    def encode_image(self, images):
        """Unimodal first-stage embedding of the image alone (mean over tokens) -> [B, W]."""
        return l2_normalize(self._encode(self.embed_image(images)).mean(axis=1))

    # ---- heads ------------------------------------------------------------------------------
    def itm_logits(self, pooled):
        return self.itm_head(pooled)

    def mlm_logits(self, text_tokens):
        """[B, L, W] -> float32 [B, L, V], tied to the word embeddings."""
        return self.mlm_head(text_tokens, self.token_embed.embedding)

    def mrfr_pred(self, patch_tokens):
        """[B, N, W] -> [B, N, p*p*3]: t(h) @ K^T + b with K the patch projection's kernel."""
        kernel = nn.meta.unbox(self.patch_embed.variables["params"]["proj"]["kernel"])
        return self.mrfr_head(patch_tokens, kernel)

    def mrc_logits(self, patch_tokens):
        """[B, N, W] -> float32 [B, N, K]."""
        if not self.num_mrc_classes:
            raise ValueError("MRC needs model.num_mrc_classes > 0")
        return self.mrc_head(patch_tokens)

    def score_pairs(self, images, tokens):
        """ITM match score of aligned pairs: logit(match) - logit(no match), float32 [B]."""
        return match_score(self.itm_logits(self.encode(images, tokens)["pooled"]))

    def __call__(self, images, tokens, patch_mask=None):
        out = self.encode(images, tokens, patch_mask)
        patches = self.image_patches(out["image"])
        out.update(itm_logits=self.itm_logits(out["pooled"]),
                   mlm_logits=self.mlm_logits(out["text"]), mrfr=self.mrfr_pred(patches))
        if self.num_mrc_classes:
            out["mrc_logits"] = self.mrc_logits(patches)
        return out


@register_model("single_stream")
def build_single_stream(cfg, vocab: dict) -> SingleStreamTransformer:
    """model.name='single_stream': width, depth, num_heads, mlp_dim, image.{image_size,
    patch_size}, text.context_length, image_cls, type_embeddings, num_mrc_classes, dtype and the
    stack options (remat, remat_policy, scan_layers, attention_implementation, dropout_rate)."""
    for section, key in (("image", "image_size"), ("image", "patch_size"),
                         ("text", "context_length")):
        if section not in cfg or key not in cfg[section]:
            raise ValueError(f"model.{section}.{key} is required for model.name='single_stream'")
    return SingleStreamTransformer(
        vocab_size=vocab["vocab_size"], width=cfg.width, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
        context_length=cfg.text.context_length, image_size=cfg.image.image_size,
        patch_size=cfg.image.patch_size, pad_id=vocab["pad_id"],
        image_cls=cfg.get("image_cls", True), type_embeddings=cfg.get("type_embeddings", True),
        num_mrc_classes=cfg.get("num_mrc_classes", 0), dtype=model_dtype(cfg),
        **stack_kwargs(cfg))
