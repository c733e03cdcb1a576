"""Captioning (language-modelling) cross-entropy with optional label smoothing.

    L = sum_t w_t [(1 - eps) * (-log p_t(y_t)) + eps * mean_v(-log p_t(v))] / sum_t w_t

(Szegedy et al. 2016's label smoothing with the uniform distribution over the V classes;
eps = 0 is the plain teacher-forcing CE of GIT / SimVLM; CoCa uses eps = 0.1.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def caption_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """logits [B, L, V], targets int [B, L], weights [B, L] (1 = counts) -> (loss [],
    dict(token_acc: weighted top-1 accuracy, nll: the unsmoothed CE, both [])).
    A batch with no weighted position gives loss 0."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    w = weights.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1e-6)
    hits = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(per_token * w) / denom, dict(token_acc=jnp.sum(hits * w) / denom,
                                                nll=jnp.sum(nll * w) / denom)
