"""Vision Transformer image encoder (Dosovitskiy et al., 2021) on the shared stack."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.registry import register_image_tower
from vlp_jax.nn.partitioning import logical
from vlp_jax.nn.patch_embed import PatchEmbed, PositionEmbedding
from vlp_jax.nn.pooling import AttentionPool, first_token, masked_mean
from vlp_jax.nn.transformer import Encoder

POOLS = ("cls", "map", "gap")


class ViT(nn.Module):
    """ViT: patch embedding + learned positions + pre-LN transformer + pooling.

    Attributes:
      patch_size, width, depth, num_heads, mlp_dim: the usual ViT sizes.
      image_size: the side of the (square) training images; fixes the position table.
      pool: 'cls' (a prepended class token), 'map' (attention pooling) or 'gap' (mean).
      remat, remat_policy, scan_layers, attention_implementation, dropout_rate, deterministic:
        the stack options (see `vlp_jax.nn.transformer.Encoder`).

    Call:
      images [B, H, W, 3];
      keep_ids: optional int [B, K] indices of the patches to encode (FLIP / MAE-style
        masking; positions are added before the gather so each kept patch keeps its place);
      return_weights: also return every block's self-attention, float32 [depth, B, h, T, T]
        (works with scan_layers, unlike a method interceptor).
    Returns:
      (pooled [B, width], tokens [B, T, width]) where T = N (+1 with a class token), N = number
      of encoded patches (, weights).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    image_size: int
    pool: str = "cls"
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True

    @property
    def num_tokens(self) -> int:
        """T, the output tokens of a full image: patches (+1 with a class token)."""
        return (self.image_size // self.patch_size) ** 2 + (self.pool == "cls")

    @nn.compact
    def __call__(self, images, keep_ids=None, return_weights=False):
        if self.pool not in POOLS:
            raise ValueError(f"ViT.pool must be one of {POOLS}, got {self.pool!r}")
        x = PatchEmbed(self.patch_size, self.width, self.dtype, name="patch_embed")(
            images.astype(self.dtype))
        num_patches = (self.image_size // self.patch_size) ** 2
        if x.shape[1] != num_patches:
            raise ValueError(f"ViT built for {self.image_size}px images got {images.shape[1:3]}")
        x = PositionEmbedding(num_patches, name="pos_embed")(x)
        if keep_ids is not None:
            x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
        if self.pool == "cls":
            cls = self.param("cls", logical(nn.initializers.zeros_init(), (None, None, "embed")),
                             (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype),
                                 x], axis=1)
        out = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                      dtype=self.dtype, remat_policy=self.remat_policy,
                      scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                      attention_implementation=self.attention_implementation,
                      name="encoder")(x, deterministic=self.deterministic,
                                      return_weights=return_weights)
        x, weights = out if return_weights else (out, None)
        if self.pool == "cls":
            pooled = first_token(x)
        elif self.pool == "gap":
            pooled = masked_mean(x)
        else:
            pooled = AttentionPool(self.num_heads, self.mlp_dim, self.dtype,
                                   self.attention_implementation, name="map")(x)
        return (pooled, x, weights) if return_weights else (pooled, x)


def random_keep_ids(rng: jax.Array, batch: int, num_patches: int, keep: int) -> jax.Array:
    """Indices of `keep` patches per example, chosen uniformly without replacement.

    The argsort-of-uniform-noise trick of MAE / FLIP: int32 [batch, keep], sorted so that
    kept patches stay in raster order.
    """
    noise = jax.random.uniform(rng, (batch, num_patches))
    ids = jnp.argsort(noise, axis=-1)[:, :keep]
    return jnp.sort(ids, axis=-1).astype(jnp.int32)


@register_image_tower("vit")
def build_vit(cfg, dtype=jnp.float32, remat=False, **stack) -> ViT:
    """model.image (type='vit'): patch_size, width, depth, num_heads, mlp_dim, image_size, pool."""
    return ViT(patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
               num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
               image_size=cfg.image_size, pool=cfg.get("pool", "cls"), remat=remat, dtype=dtype,
               **stack)
