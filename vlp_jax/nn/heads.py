"""Output heads shared by the models: projection, pooler, ITM head, prediction (MLM / LM /
regression) heads with optional tied output tables.

  projection(D)        Dense(W -> D) into the joint ITC embedding space (CLIP, ALBEF)
  Pooler               tanh(Dense(x[:, 0])), BERT's pooler                     [B, L, W] -> [B, W]
  itm_head             Dense(W -> 2): logits (no match, match)
  match_score          logit(match) - logit(no match), the ranking score of a pair
  HeadTransform        BERT's prediction-head transform Dense(W) -> GELU -> LayerNorm
  PredictionHead       transform, then logits against a tied table (the word embeddings for
                       MLM / LM, ViLT's patch projection for MRFR) + bias, or an own Dense
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import dense_init, layer_norm, zeros


def projection(features: int, use_bias: bool = False, dtype=jnp.float32,
               name: str | None = None) -> nn.Dense:
    """Dense(W -> features) with the (`embed`, `proj`) layout; params kernel [W, D] (, bias [D])."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=dense_init(("embed", "proj")), bias_init=zeros(("proj",)))


class HeadTransform(nn.Module):
    """BERT's prediction-head transform: Dense(W) -> GELU -> LayerNorm, [..., W] -> [..., W].
    Params dense/{kernel [W, W], bias [W]}, ln/{scale, bias}."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(width, dtype=self.dtype, name="dense",
                     kernel_init=dense_init(("embed", None)), bias_init=zeros((None,)))(x)
        return layer_norm("ln", self.dtype)(nn.gelu(x))


class Pooler(nn.Module):
    """tanh(Dense(x[:, 0])): [B, L, W] -> [B, W]. Params dense/{kernel [W, W], bias [W]}."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(x.shape[-1], dtype=self.dtype, name="dense",
                                 kernel_init=dense_init(("embed", None)),
                                 bias_init=zeros((None,)))(x[:, 0]))


def itm_head(dtype=jnp.float32, name: str | None = "itm_head") -> nn.Dense:
    """Linear(W, 2): logits of (no match, match). Params kernel [W, 2], bias [2]."""
    return nn.Dense(2, dtype=dtype, name=name, kernel_init=dense_init(("embed", None)),
                    bias_init=zeros((None,)))


def match_score(itm_logits: jax.Array) -> jax.Array:
    """Pair score for ranking: logit(match) - logit(no match), [B, 2] -> float32 [B]."""
    itm_logits = itm_logits.astype(jnp.float32)
    return itm_logits[:, 1] - itm_logits[:, 0]


class PredictionHead(nn.Module):
    """Prediction head: logits = t(x) @ E^T + b (tied) or Dense(t(x)) (untied), float32.

    Attributes:
      num_outputs: V (vocabulary, classes, or regression targets).
      tied: the caller passes the output table E [V, W] (BERT ties MLM to the word
        embeddings; ViLT's MRFR ties to the patch projection).
      transform: apply `HeadTransform` first (BERT); False = logits straight from x.
      bias_axis: logical axis name of the bias (e.g. 'vocab', 'patch').
    Params: transform/... (if transform), bias [V] (tied) or dense/{kernel [W, V], bias [V]}.
    Call: x [..., W], table [V, W] (tied only) -> float32 [..., V].
    """

    num_outputs: int
    tied: bool = True
    transform: bool = True
    bias_axis: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, table=None):
        h = HeadTransform(self.dtype, name="transform")(x) if self.transform else x
        if not self.tied:
            if table is not None:
                raise ValueError("PredictionHead(tied=False) takes no output table")
            return nn.Dense(self.num_outputs, dtype=self.dtype, name="dense",
                            kernel_init=dense_init(("embed", self.bias_axis)),
                            bias_init=zeros((self.bias_axis,)))(h).astype(jnp.float32)
        if table is None or table.shape != (self.num_outputs, x.shape[-1]):
            raise ValueError(f"PredictionHead(tied=True) needs a table [{self.num_outputs}, "
                             f"{x.shape[-1]}], got {None if table is None else table.shape}")
        bias = self.param("bias", zeros((self.bias_axis,)), (self.num_outputs,))
        logits = jnp.einsum("...w,vw->...v", h, table.astype(h.dtype))
        return logits.astype(jnp.float32) + bias


class TokenProjection(nn.Module):
    """LayerNorm(Dense(x)): image-tower tokens [B, T, Wv] -> decoder-width tokens [B, T, W]
    (GIT's visual projection; the encoder-decoder's image input). Params dense/{kernel [Wv, W],
    bias [W]}, ln/{scale, bias}."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, dtype=self.dtype, name="dense",
                     kernel_init=dense_init((None, "embed")), bias_init=zeros(("embed",)))(x)
        return layer_norm("ln", self.dtype)(x)
