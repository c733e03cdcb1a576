"""Pieces shared by the self-supervised contrastive variants (SLIP, A-CLIP, MaskCLIP): the small
heads they add next to the dual encoder (SimCLR projector, online predictor, token predictors),
helpers that read the dual encoder's towers beyond the pooled embedding, and config checks.

The heads are Flax modules initialised by Flax with the dual encoder (`methods.heads.WithHeads`):
their parameters live beside the `DualEncoder`'s in the same flat params dict, under their own
top-level key (e.g. params['slip_head']); `DualEncoder.apply` ignores keys it does not own, so
the predict functions and every ContrastiveMethod helper work unchanged.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.dual_encoder import l2_normalize
from vlp_jax.nn.attention import make_attention_mask
from vlp_jax.nn.norm import LayerNorm
from vlp_jax.nn.partitioning import dense_init, logical, ones, zeros
from vlp_jax.nn.patch_embed import PositionEmbedding
from vlp_jax.nn.transformer import Encoder

# The dual encoder's top-level parameter names (the EMA teachers of A-CLIP / MaskCLIP average
# these; `logit_bias` exists only for sigmoid losses).
DUAL_ENCODER_KEYS = ("image_tower", "text_tower", "image_proj", "text_proj", "logit_scale",
                     "logit_bias")


class ProjectionMLP(nn.Module):
    """`num_layers` Dense layers, LayerNorm + GELU between them: [..., W] -> [..., out_dim].

    SimCLR / SLIP use BatchNorm + ReLU; LayerNorm keeps the head free of batch statistics (so
    it is the same function on one device or sharded over many).
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.num_layers < 1:
            raise ValueError(f"ProjectionMLP.num_layers must be >= 1, got {self.num_layers}")
        for i in range(self.num_layers - 1):
            names = ("embed", "mlp") if i == 0 else ("mlp", None)
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"fc{i}",
                         kernel_init=dense_init(names), bias_init=zeros(("mlp",)))(x)
            x = LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"ln{i}",
                          scale_init=ones(("mlp",)), bias_init=zeros(("mlp",)))(x)
            x = nn.gelu(x)
        last_in = "embed" if self.num_layers == 1 else "mlp"
        return nn.Dense(self.out_dim, dtype=self.dtype, name=f"fc{self.num_layers - 1}",
                        kernel_init=dense_init((last_in, "proj")), bias_init=zeros(("proj",)))(x)


class MaskedTokenPredictor(nn.Module):
    """MAE-style light decoder: visible-token features + mask tokens -> a prediction per patch.

    Call:
      visible [B, K, W] (the student's features of the kept patches), keep_ids int [B, K],
      num_patches N.
    Returns: [B, N, out_dim]; rows at kept positions are computed too (callers weight them 0).
    """

    width: int
    depth: int
    num_heads: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, visible, keep_ids, num_patches):
        b = visible.shape[0]
        x = nn.Dense(self.width, dtype=self.dtype, name="embed",
                     kernel_init=dense_init(("embed", None)), bias_init=zeros(("embed",)))(visible)
        mask_token = self.param("mask_token", logical(nn.initializers.normal(0.02),
                                                      (None, None, "embed")), (1, 1, self.width))
        full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, num_patches, self.width))
        full = jax.vmap(lambda f, i, v: f.at[i].set(v))(full, keep_ids, x)
        full = PositionEmbedding(num_patches, name="pos_embed")(full)
        full = Encoder(self.depth, self.num_heads, 4 * self.width, dtype=self.dtype,
                       name="encoder")(full)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="head",
                        kernel_init=dense_init(("embed", None)), bias_init=zeros((None,)))(full)


class TextTokenPredictor(nn.Module):
    """Bidirectional light decoder over a (masked) caption's student token features.

    Call: tokens [B, L, W], valid bool [B, L] -> predictions [B, L, out_dim]. Bidirectional so
    a masked position sees the words after it even when the text tower is causal.
    """

    depth: int
    num_heads: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, valid):
        width = tokens.shape[-1]
        x = Encoder(self.depth, self.num_heads, 4 * width, dtype=self.dtype, name="encoder")(
            tokens, mask=make_attention_mask(valid, valid))
        return nn.Dense(self.out_dim, dtype=self.dtype, name="head",
                        kernel_init=dense_init(("embed", None)), bias_init=zeros((None,)))(x)


def image_features(model: nn.Module, params, images, keep_ids=None):
    """(embedding [B, D] unit-norm, pooled [B, W], tokens [B, T, W]) of the image tower.

    `tokens` are the tower's output tokens: a class token first when the ViT pools with one,
    then one per encoded (kept) patch.
    """
    def fn(m, x, k):
        pooled, tokens = m.image_tower(x, keep_ids=k)
        return l2_normalize(m.image_proj(pooled)), pooled, tokens
    return model.apply({"params": params}, images, keep_ids, method=fn)


def text_features(model: nn.Module, params, tokens):
    """(embedding [B, D] unit-norm, pooled [B, W], tokens [B, L, W], valid bool [B, L])."""
    def fn(m, t):
        pooled, feats, valid = m.text_tower(t)
        return l2_normalize(m.text_proj(pooled)), pooled, feats, valid
    return model.apply({"params": params}, tokens, method=fn)


def project_patch_tokens(model: nn.Module, params, tokens):
    """The image projection applied to every token: [B, T, W] -> unit-norm [B, T, D]."""
    return model.apply({"params": params}, tokens,
                       method=lambda m, t: l2_normalize(m.image_proj(t)))


def patch_count(model: nn.Module) -> int:
    """Number of patches N of the dual encoder's ViT; ValueError for non-patch towers."""
    tower = getattr(model, "image_tower", None)
    if tower is None or not hasattr(tower, "patch_size"):
        raise ValueError("this method masks image patches and needs a ViT image tower "
                         f"(model.image.type='vit'), not {type(tower).__name__}")
    return (tower.image_size // tower.patch_size) ** 2


def patch_tokens(tokens: jax.Array, num_kept: int) -> jax.Array:
    """Drops a leading class token if present: [B, T, W] with T in {K, K+1} -> [B, K, W]."""
    return tokens[:, tokens.shape[1] - num_kept:]


def require_accumulation_none(config, method: str) -> None:
    mode = config.get("accumulation", "none")
    if mode != "none":
        raise ValueError(f"method.accumulation={mode!r} is not supported by {method} (its extra "
                         "losses are not split over micro-batches); valid: ['none']")


def require_key(batch: dict, key: str, method: str, flag: str) -> None:
    if key not in batch:
        raise ValueError(f"{method} needs batch[{key!r}]; set {flag} (batch keys: {sorted(batch)})")


def pooled_example(base: nn.Module, images, tokens) -> tuple:
    """A head's example input inside `WithHeads.init`: the image tower's pooled output [B, W]."""
    return (base.image_tower(images)[0],)
