"""Self-distillation objectives of the masked / EMA-teacher CLIP variants (A-CLIP, MaskCLIP),
and the token masking they share.

All are per-example or per-position losses averaged over the *global* batch; they take global
arrays (the trainer's jit shards them over the mesh) and need no cross-device code of their own.
Targets are treated as constants (`stop_gradient`): they come from the EMA teacher.

    feature_distance(p, t, 'cosine')    = 1 - <p/|p|, t/|t|>          (BYOL's 2 - 2cos, halved)
    feature_distance(p, t, 'smooth_l1') = mean_d smooth_l1(p_d - t_d)  (data2vec; beta = 1)
    masked_feature_loss = sum_{masked (b, n)} distance / #masked        (MaskCLIP's MSD)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vlp_jax.nn.collectives import l2_normalize

DISTANCES = ("cosine", "smooth_l1")


def feature_distance(pred: jax.Array, target: jax.Array, kind: str = "cosine") -> jax.Array:
    """Distance along the last axis: [..., D] x [..., D] -> [...], target not differentiated."""
    target = jax.lax.stop_gradient(target.astype(jnp.float32))
    pred = pred.astype(jnp.float32)
    if kind == "cosine":
        return 1.0 - jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)
    if kind == "smooth_l1":
        diff = jnp.abs(pred - target)
        return jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)
    raise ValueError(f"distillation distance {kind!r} is unknown; valid: {DISTANCES}")


def masked_feature_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                        kind: str = "cosine") -> jax.Array:
    """Mean distance over the positions where `mask` is True.

    pred, target [B, N, D]; mask bool [B, N] (True = masked = to be predicted). Returns [] (0 when
    nothing is masked).
    """
    d = feature_distance(pred, target, kind)
    w = mask.astype(jnp.float32)
    return jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0)


def layer_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm over the last axis (data2vec / MaskCLIP target normalisation)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def mask_from_keep_ids(keep_ids: jax.Array, num_patches: int) -> jax.Array:
    """bool [B, N], True at the patches *not* in keep_ids [B, K] (the masked ones)."""
    kept = jnp.zeros((keep_ids.shape[0], num_patches), bool)
    kept = jax.vmap(lambda row, ids: row.at[ids].set(True))(kept, keep_ids)
    return ~kept


def bert_mask_tokens(rng: jax.Array, tokens: jax.Array, mask_id: int, vocab_size: int,
                     special_ids: Sequence[int], prob: float = 0.15
                     ) -> tuple[jax.Array, jax.Array]:
    """BERT's masking (Devlin et al. 2019): choose each ordinary token with probability `prob`;
    of the chosen, 80% become `mask_id`, 10% a random token, 10% stay. A random draw that
    hits a special id becomes `mask_id` instead.

    tokens int [B, L]; special ids (pad, bos, eos, mask) are never chosen.
    Returns (masked tokens int [B, L], chosen bool [B, L]).
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"text mask probability must be in (0, 1), got {prob}")
    k_choose, k_kind, k_rand = jax.random.split(rng, 3)
    ordinary = jnp.ones(tokens.shape, bool)
    for sid in special_ids:
        ordinary &= tokens != sid
    chosen = ordinary & (jax.random.uniform(k_choose, tokens.shape) < prob)
    u = jax.random.uniform(k_kind, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, tokens.dtype)
    for sid in special_ids:   # a random special id (pad!) would break the caption's layout
        random_tokens = jnp.where(random_tokens == sid, mask_id, random_tokens)
    out = jnp.where(chosen & (u < 0.8), mask_id, tokens)
    out = jnp.where(chosen & (u >= 0.8) & (u < 0.9), random_tokens, out)
    return out.astype(tokens.dtype), chosen
