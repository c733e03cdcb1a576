"""Pre-LayerNorm transformer blocks and stacks, shared by every image and text encoder.

Block (pre-LN, as in ViT / CLIP):   x = x + MHA(LN(x));  [x = x + CrossMHA(LN(x), ctx)];
                                    x = x + MLP(LN(x)),  MLP = Dense(mlp) -> GELU -> Dense(W).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.nn.attention import MultiHeadAttention
from vlp_jax.nn.partitioning import dense_init, layer_norm, zeros


class MlpBlock(nn.Module):
    """Position-wise MLP: [B, L, W] -> [B, L, W] through `mlp_dim` GELU units."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1",
                     kernel_init=dense_init(("embed", "mlp")), bias_init=zeros(("mlp",)))(x)
        h = nn.gelu(h)
        return nn.Dense(width, dtype=self.dtype, name="fc2",
                        kernel_init=dense_init(("mlp", "embed")), bias_init=zeros(("embed",)))(h)


class EncoderBlock(nn.Module):
    """One pre-LN block: self-attention, optional cross-attention to `context`, MLP.

    Call: x [B, L, W]; mask bool [B|1, 1, L, L]; context [B, K, W'] with context_mask
    bool [B, 1, L|1, K]. Returns [B, L, W].
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None):
        x = x + MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
            layer_norm("ln_attn", self.dtype)(x), mask=mask)
        if self.cross_attention:
            if context is None:
                raise ValueError("EncoderBlock(cross_attention=True) needs a `context`")
            x = x + MultiHeadAttention(self.num_heads, self.dtype, name="cross_attn")(
                layer_norm("ln_cross", self.dtype)(x), context, mask=context_mask)
        x = x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm("ln_mlp", self.dtype)(x))
        return x


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks followed by a final LayerNorm.

    Attributes:
      remat: rematerialise each block in the backward pass (saves activation memory).
      cross_attention_every: if > 0, blocks whose index i satisfies
        (i + 1) % cross_attention_every == 0 also cross-attend to `context`.
    Call: x [B, L, W] -> [B, L, W].
    """

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention_every: int = 0
    remat: bool = False
    final_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None):
        block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
        for i in range(self.depth):
            cross = self.cross_attention_every > 0 and (i + 1) % self.cross_attention_every == 0
            x = block_cls(self.num_heads, self.mlp_dim, cross, self.dtype, name=f"block{i}")(
                x, mask, context if cross else None, context_mask if cross else None)
        if self.final_norm:
            x = layer_norm("ln_final", self.dtype)(x)
        return x
