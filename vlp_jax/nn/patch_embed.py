"""Patch embedding and position embeddings for vision transformers."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import dense_init, logical, zeros


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order.

    Raises ValueError if H or W is not a multiple of p.
    """
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


class PatchEmbed(nn.Module):
    """Linear projection of flattened p x p patches (a stride-p convolution).

    Call: images [B, H, W, C] -> tokens [B, N, W], N = (H/p)(W/p).
    The kernel is a Dense on `patchify` output, so masked patch modelling (MRFR) can tie
    a regression head to it.
    """

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        patches = patchify(images, self.patch_size)
        return nn.Dense(self.width, dtype=self.dtype, name="proj",
                        kernel_init=dense_init(("patch", "embed")),
                        bias_init=zeros(("embed",)))(patches)


class PositionEmbedding(nn.Module):
    """Learned additive position embedding: x [B, L, W] -> x + pos[:L]."""

    max_length: int
    stddev: float = 0.02

    @nn.compact
    def __call__(self, x):
        length, width = x.shape[-2:]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        pos = self.param("pos_embedding",
                         logical(nn.initializers.normal(self.stddev), ("pos", "embed")),
                         (self.max_length, width))
        return x + pos[:length].astype(x.dtype)
