"""Vision Transformer image encoder (Dosovitskiy et al., 2021)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

    Call:
      images [B, H, W, 3];
      keep_ids: optional int [B, K] indices of the patches to encode (FLIP / MAE-style
        masking; positions are added before the gather so each kept patch keeps its place).
    Returns:
      (pooled [B, width], tokens [B, T, width]) where T = N (+1 with a class token), N = number
      of encoded patches.
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

    @nn.compact
    def __call__(self, images, keep_ids=None):
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
        x = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, dtype=self.dtype,
                    name="encoder")(x)
        if self.pool == "cls":
            pooled = first_token(x)
        elif self.pool == "gap":
            pooled = masked_mean(x)
        else:
            pooled = AttentionPool(self.num_heads, self.mlp_dim, self.dtype, name="map")(x)
        return pooled, x


def random_keep_ids(rng: jax.Array, batch: int, num_patches: int, keep: int) -> jax.Array:
    """Indices of `keep` patches per example, chosen uniformly without replacement.

    The argsort-of-uniform-noise trick of MAE / FLIP: int32 [batch, keep], sorted so that
    kept patches stay in raster order.
    """
    noise = jax.random.uniform(rng, (batch, num_patches))
    ids = jnp.argsort(noise, axis=-1)[:, :keep]
    return jnp.sort(ids, axis=-1).astype(jnp.int32)
