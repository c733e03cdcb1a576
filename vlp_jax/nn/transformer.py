"""Pre-LayerNorm transformer blocks and the one stack shared by every image, text and fusion
encoder (and, with `decode=True`, by decoders).

Block (pre-LN, as in ViT / CLIP):   x = x + Drop(MHA(LN(x)));  [x = x + Drop(CrossMHA(LN(x), ctx))];
                                    x = x + Drop(FFN(LN(x)))
FFN is pluggable:
  dense MLP                     Dense(mlp) -> GELU -> Dense(W)                (`MlpBlock`)
  modality experts (E > 0)      FFN_{m(t)}(x_t), one MLP per modality, chosen per token by
                                the int modality id m(t) (VLMo's MoME, Bao et al. 2022;
                                BEiT-3's Multiway transformer)            (`ModalityExperts`)

Dropout is the residual dropout of Vaswani et al. (2017) §5.4 on each sub-layer's output, active
only with `deterministic=False` and an rng named 'dropout'. Deviation: no dropout on the
attention probabilities (BERT has it), because the fused `jax.nn.dot_product_attention` kernels
do not offer it.

The stack (`Encoder`) runs its blocks as a Python loop (parameters `block0`, `block1`, ...) or,
with `scan_layers=True`, as one `nn.scan` over identical blocks (parameters `blocks/...` with a
leading `layers` axis of size depth: compile time no longer grows with depth). `remat=True`
rematerialises each block in the backward pass with the `jax.checkpoint_policies` policy named
by `remat_policy`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.attention import MultiHeadAttention
from vlp_jax.nn.partitioning import dense_init, layer_norm, zeros
from vlp_jax.parallel.mesh import constrain_to_batch

REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")
LAYER_AXIS = "layers"    # logical name of the stacked-layer axis of scanned parameters


def remat_policy(name: str):
    """The `jax.checkpoint_policies` function called `name` (one of REMAT_POLICIES)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {name!r}")
    return getattr(jax.checkpoint_policies, name)


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


class ModalityExperts(nn.Module):
    """One MLP per modality, chosen per token (VLMo / BEiT-3 modality experts).

    Call: x [B, L, W], modality_ids int [B, L] in [0, num_experts) -> [B, L, W] with
    y_t = MLP_{m_t}(x_t). Parameters `expert{e}/fc1|fc2`.
    Deviation (cost, not result): every expert runs on every token and the outputs are
    selected (E x the FLOPs of one MLP); a dispatch by sorting tokens is left for later.
    """

    num_experts: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, modality_ids):
        if modality_ids is None:
            raise ValueError("ModalityExperts needs `modality_ids` int [B, L]")
        out = jnp.zeros_like(x)
        for e in range(self.num_experts):
            y = MlpBlock(self.mlp_dim, self.dtype, name=f"expert{e}")(x)
            out = jnp.where((modality_ids == e)[..., None], y, out)
        return out


class EncoderBlock(nn.Module):
    """One pre-LN block: self-attention, optional cross-attention to `context`, FFN.

    Attributes:
      num_experts: 0 = one dense MLP (`mlp`); E > 0 = modality experts (`experts/expert{e}`).
      dropout_rate: residual dropout (active with deterministic=False).
      attention_implementation: see `MultiHeadAttention.implementation`.
      decode, max_decode_length: incremental decoding of the self-attention (see
        `MultiHeadAttention`).
    Call: x [B, L, W]; mask bool [B|1, 1, L, L]; context [B, K, W'] with context_mask
    bool [B, 1, L|1, K]; modality_ids int [B, L] (with experts); deterministic;
    return_weights (also return the self-attention probabilities float32 [B, h, L, L]).
    Returns [B, L, W] (, weights).
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Any = jnp.float32
    num_experts: int = 0
    dropout_rate: float = 0.0
    attention_implementation: str | None = None
    decode: bool = False
    max_decode_length: int = 0

    def _forward(self, x, mask, context, context_mask, modality_ids, deterministic,
                 return_weights):
        drop = nn.Dropout(self.dropout_rate)
        attn = MultiHeadAttention(self.num_heads, self.dtype, self.attention_implementation,
                                  self.decode, self.max_decode_length, name="attn")
        y = layer_norm("ln_attn", self.dtype)(x)
        weights = None
        if return_weights:
            y, weights = attn(y, mask=mask, return_weights=True)
        else:
            y = attn(y, mask=mask)
        x = x + drop(y, deterministic=deterministic)
        if self.cross_attention:
            if context is None:
                raise ValueError("EncoderBlock(cross_attention=True) needs a `context`")
            y = MultiHeadAttention(self.num_heads, self.dtype, self.attention_implementation,
                                   name="cross_attn")(layer_norm("ln_cross", self.dtype)(x),
                                                      context, mask=context_mask)
            x = x + drop(y, deterministic=deterministic)
        y = layer_norm("ln_mlp", self.dtype)(x)
        if self.num_experts:
            y = ModalityExperts(self.num_experts, self.mlp_dim, self.dtype, name="experts")(
                y, modality_ids)
        else:
            y = MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)
        x = x + drop(y, deterministic=deterministic)
        return (x, weights) if return_weights else x

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None, modality_ids=None,
                 deterministic=True, return_weights=False):
        return self._forward(x, mask, context, context_mask, modality_ids, deterministic,
                             return_weights)


class _StackBlock(EncoderBlock):
    """EncoderBlock with the Python flags as attributes, so `nn.remat` / `nn.scan` see arrays
    (or None) only. Returns (x, self-attention weights or None) as a scan body does."""

    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None, modality_ids=None):
        out = self._forward(x, mask, context, context_mask, modality_ids, self.deterministic,
                            self.return_weights)
        out, weights = out if self.return_weights else (out, None)
        return constrain_to_batch(out), weights


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks followed by a final LayerNorm.

    Attributes:
      cross_attention_every: if > 0, blocks whose index i satisfies
        (i + 1) % cross_attention_every == 0 also cross-attend to `context`.
      remat, remat_policy: rematerialise each block (policy: a REMAT_POLICIES name).
      scan_layers: one `nn.scan` over the blocks (needs identical blocks: cross_attention_every
        0 or 1). Parameters `blocks/<block params>` with a leading axis of size depth.
      num_experts, dropout_rate, attention_implementation, decode, max_decode_length: passed
        to every block.
    Call: x [B, L, W], mask, context, context_mask, modality_ids as `EncoderBlock`;
      deterministic; return_weights.
    Returns [B, L, W] (, self-attention weights float32 [depth, B, h, L, L]).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention_every: int = 0
    remat: bool = False
    final_norm: bool = True
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    num_experts: int = 0
    dropout_rate: float = 0.0
    attention_implementation: str | None = None
    decode: bool = False
    max_decode_length: int = 0

    def _block_kwargs(self, cross: bool, deterministic: bool, return_weights: bool) -> dict:
        return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross_attention=cross,
                    dtype=self.dtype, num_experts=self.num_experts,
                    dropout_rate=self.dropout_rate,
                    attention_implementation=self.attention_implementation,
                    decode=self.decode, max_decode_length=self.max_decode_length,
                    deterministic=deterministic, return_weights=return_weights)

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None, modality_ids=None,
                 deterministic=True, return_weights=False):
        block_cls = _StackBlock
        if self.remat:
            block_cls = nn.remat(_StackBlock, policy=remat_policy(self.remat_policy),
                                 prevent_cse=not self.scan_layers)
        if self.scan_layers:
            if self.cross_attention_every > 1:
                raise ValueError("scan_layers needs identical blocks: cross_attention_every must "
                                 f"be 0 or 1, got {self.cross_attention_every}")
            cross = self.cross_attention_every == 1
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 4, length=self.depth,
                              metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
            x, weights = scanned(**self._block_kwargs(cross, deterministic, return_weights),
                                 name="blocks")(x, mask, context if cross else None,
                                                context_mask if cross else None, modality_ids)
        else:
            weights = []
            for i in range(self.depth):
                cross = (self.cross_attention_every > 0
                         and (i + 1) % self.cross_attention_every == 0)
                x, w = block_cls(**self._block_kwargs(cross, deterministic, return_weights),
                                 name=f"block{i}")(x, mask, context if cross else None,
                                                   context_mask if cross else None, modality_ids)
                weights.append(w)
            weights = jnp.stack(weights) if return_weights else None
        if self.final_norm:
            x = layer_norm("ln_final", self.dtype)(x)
        return (x, weights) if return_weights else x


def stack_block_params(params: dict, depth: int) -> dict:
    """Unscanned Encoder params {block0..block{depth-1}, ln_final} -> scanned {blocks, ln_final}
    (each block leaf stacked along a new leading axis). For importers and tests."""
    params = nn.meta.unbox(params)
    blocks = [params[f"block{i}"] for i in range(depth)]
    out = {k: v for k, v in params.items() if not k.startswith("block")}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def stack_layers(params: dict) -> dict:
    """Every unscanned stack in a parameter tree -> its scanned layout: any mapping holding
    `block0..block{n-1}` gets them replaced by one `blocks` entry (leaves stacked on a new
    leading axis). Converts a whole model's params (Encoder and CoAttentionEncoder alike)."""
    params = nn.meta.unbox(params)
    if not isinstance(params, dict):
        return params
    n = 0
    while f"block{n}" in params:
        n += 1
    out = {k: stack_layers(v) for k, v in params.items()
           if not (k.startswith("block") and k[5:].isdigit())}
    if n:
        out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[stack_layers(params[f"block{i}"]) for i in range(n)])
    return out
