"""Co-attention fusion (ViLBERT, Lu et al. 2019; LXMERT, Tan & Bansal 2019).

Two streams, text t [B, L, Wt] and image v [B, N, Wv], exchange information in every block
(pre-LN form of ViLBERT's Co-TRM followed by a TRM in each stream):

    t1 = t + CrossAttn_t(LN(t), LN(v))        (text queries, image keys/values)
    v1 = v + CrossAttn_v(LN(v), LN(t))        (image queries, text keys/values, text padding masked)
    t2 = EncoderBlock_t(t1)                   (self-attention + MLP within the text stream)
    v2 = EncoderBlock_v(v1)

Both cross-attentions read the block's *inputs*, so the two directions are computed in
parallel and the block is symmetric: swapping the streams (and their parameter sets) swaps the
outputs. `shared_cross_attention=True` uses one cross-attention module for both directions
(LXMERT's cross-modality layer shares its attention weights; this needs Wt == Wv).
The blocks are the shared stack's (`vlp_jax.nn.transformer.EncoderBlock`), and the encoder
takes the same stack options (remat policy, nn.scan over blocks, attention implementation,
dropout).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.nn.attention import MultiHeadAttention, make_attention_mask
from vlp_jax.nn.partitioning import layer_norm
from vlp_jax.nn.transformer import LAYER_AXIS, EncoderBlock, remat_policy


class CrossAttentionLayer(nn.Module):
    """x + Drop(MHA(LN_q(x), LN_kv(context))): x [B, Q, W], context [B, K, W'] -> [B, Q, W].

    `attention` may be given to share one attention module between layers (LXMERT).
    """

    num_heads: int
    attention: nn.Module | None = None
    dtype: Any = jnp.float32
    attention_implementation: str | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, context, mask=None, deterministic=True):
        attn = self.attention
        if attn is None:
            attn = MultiHeadAttention(self.num_heads, self.dtype, self.attention_implementation,
                                      name="attn")
        y = attn(layer_norm("ln_q", self.dtype)(x), layer_norm("ln_kv", self.dtype)(context),
                 mask=mask)
        return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class CoAttentionBlock(nn.Module):
    """One co-attention block (see module docstring).

    Call: text [B, L, Wt], image [B, N, Wv], text_valid bool [B, L], image_valid bool [B, N]
    (None = all valid). Returns (text [B, L, Wt], image [B, N, Wv]).
    """

    num_heads: int
    mlp_dim: int
    shared_cross_attention: bool = False
    dtype: Any = jnp.float32
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, text, image, text_valid=None, image_valid=None):
        return self._forward(text, image, text_valid, image_valid)

    def _forward(self, text, image, text_valid, image_valid):
        tv = jnp.ones(text.shape[:2], bool) if text_valid is None else text_valid
        iv = jnp.ones(image.shape[:2], bool) if image_valid is None else image_valid
        impl, rate, det = self.attention_implementation, self.dropout_rate, self.deterministic
        shared = None
        if self.shared_cross_attention:
            if text.shape[-1] != image.shape[-1]:
                raise ValueError("model.coattention_shared=True needs equal text and image widths, "
                                 f"got {text.shape[-1]} and {image.shape[-1]}")
            shared = MultiHeadAttention(self.num_heads, self.dtype, impl, name="shared_cross_attn")
        t1 = CrossAttentionLayer(self.num_heads, shared, self.dtype, impl, rate,
                                 name="text_coattn")(text, image, make_attention_mask(tv, iv), det)
        v1 = CrossAttentionLayer(self.num_heads, shared, self.dtype, impl, rate,
                                 name="image_coattn")(image, text, make_attention_mask(iv, tv), det)
        block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                     dropout_rate=rate, attention_implementation=impl)
        t2 = EncoderBlock(**block, name="text_block")(t1, make_attention_mask(tv, tv),
                                                      deterministic=det)
        v2 = EncoderBlock(**block, name="image_block")(v1, make_attention_mask(iv, iv),
                                                       deterministic=det)
        return t2, v2


class _ScanCoBlock(CoAttentionBlock):
    """CoAttentionBlock as an nn.scan body: carry (text, image), broadcast validity."""

    @nn.compact
    def __call__(self, carry, text_valid=None, image_valid=None):
        return self._forward(*carry, text_valid, image_valid), None


class CoAttentionEncoder(nn.Module):
    """`depth` CoAttentionBlocks, then a final LayerNorm per stream.

    Parameters `block{i}/...` (loop) or `blocks/...` with a leading depth axis (scan_layers).
    Call: (text [B, L, Wt], image [B, N, Wv], text_valid, image_valid) -> (text, image).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    shared_cross_attention: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, text, image, text_valid=None, image_valid=None):
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  shared_cross_attention=self.shared_cross_attention, dtype=self.dtype,
                  attention_implementation=self.attention_implementation,
                  dropout_rate=self.dropout_rate, deterministic=self.deterministic)
        if self.scan_layers:
            body = _ScanCoBlock
            if self.remat:
                body = nn.remat(body, policy=remat_policy(self.remat_policy), prevent_cse=False)
            scanned = nn.scan(body, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                              metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
            (text, image), _ = scanned(**kw, name="blocks")((text, image), text_valid,
                                                            image_valid)
        else:
            block_cls = CoAttentionBlock
            if self.remat:
                block_cls = nn.remat(block_cls, policy=remat_policy(self.remat_policy))
            for i in range(self.depth):
                text, image = block_cls(**kw, name=f"block{i}")(text, image, text_valid,
                                                                image_valid)
        return (layer_norm("ln_text", self.dtype)(text),
                layer_norm("ln_image", self.dtype)(image))
