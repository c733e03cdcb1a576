"""Momentum distillation of ALBEF (Li et al. 2021, sec. 3.3) as pure functions.

A momentum ("teacher") copy of the model, theta_m <- m theta_m + (1 - m) theta
(`vlp_jax.objectives.teacher.EmaTeacher`, the one EMA implementation), produces
pseudo-targets; its image and text features are also kept in two FIFO queues that serve as
extra contrastive negatives (MoCo-style). With s(I, T) = g(v_cls) . g'(w'_cls) / tau over the
batch and the queue, ALBEF's ITC (eq. 1-2, 6) is

    L_itc = 1/2 E[ H((1 - a) y^i2t + a q^i2t, p^i2t) + H((1 - a) y^t2i + a q^t2i, p^t2i) ]

p = softmax of the online model's similarities, q = softmax of the momentum model's, y the
one-hot positive and H the cross-entropy; alpha ramps up linearly during the first epoch.
The queue is a dict (`queue_init`) so a method keeps it in its aux state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.nn.collectives import AxisName, global_sum, row_offset

NEG_INF = -1e9   # finite "minus infinity" for masked logits (0 * NEG_INF stays 0)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """H(q, softmax(z)) = -sum_c q_c log softmax(z)_c. logits, target_probs [..., C] -> [...]."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(target_probs.astype(jnp.float32) * log_p, axis=-1)


def distill_alpha(step: int | jax.Array, alpha: float, ramp_steps: int) -> jax.Array:
    """alpha * min(1, step / ramp_steps): 0 at step 0, `alpha` from `ramp_steps` on (ALBEF
    ramps over the first epoch). ramp_steps <= 0 means no ramp. Returns float32 []."""
    alpha = jnp.asarray(alpha, jnp.float32)
    if ramp_steps <= 0:
        return alpha
    frac = jnp.asarray(step, jnp.float32) / float(ramp_steps)
    return alpha * jnp.clip(frac, 0.0, 1.0)


# ---- feature queue (a ring buffer of momentum features) ------------------------------------
def queue_init(size: int, dim: int, dtype=jnp.float32) -> dict:
    """dict(feats [Q, D] zeros, ptr int32 [] = next write row, filled int32 [] = rows written)."""
    if size < 1 or dim < 1:
        raise ValueError(f"queue size (queue_size) and dim must be positive, got {size}, {dim}")
    return dict(feats=jnp.zeros((size, dim), dtype), ptr=jnp.zeros((), jnp.int32),
                filled=jnp.zeros((), jnp.int32))


def queue_push(queue: dict, feats: jax.Array) -> dict:
    """Writes feats [G, D] (no gradient) at rows ptr, ptr+1, .. (mod Q) and advances ptr by G
    (mod Q): a FIFO ring buffer whose oldest entries are overwritten first.

    ALBEF/MoCo require Q % G == 0; here any G <= Q works (a write that reaches the end wraps
    around to row 0). Raises ValueError if G > Q (a push would overwrite itself).
    """
    size = queue["feats"].shape[0]
    g = feats.shape[0]
    if g > size:
        raise ValueError(f"queue size (queue_size) {size} must be at least the global batch "
                         f"{g} that is pushed each step")
    new = jax.lax.stop_gradient(feats).astype(queue["feats"].dtype)
    ptr = queue["ptr"].astype(jnp.int32)
    if size % g == 0:     # the write never straddles the end: one contiguous slice
        buf = jax.lax.dynamic_update_slice(queue["feats"], new, (ptr, jnp.int32(0)))
    else:
        buf = queue["feats"].at[(ptr + jnp.arange(g, dtype=jnp.int32)) % size].set(new)
    return dict(feats=buf, ptr=(ptr + g) % size,
                filled=jnp.minimum(queue["filled"] + g, size).astype(jnp.int32))


def queue_valid_mask(queue: dict) -> jax.Array:
    """bool [Q]: rows written at least once (the buffer fills from row 0 before wrapping)."""
    return jnp.arange(queue["feats"].shape[0]) < queue["filled"]


def _bank(queue: dict | jax.Array) -> jax.Array:
    return queue["feats"] if isinstance(queue, dict) else queue


def itc_with_queue(image_feat: jax.Array, text_feat: jax.Array, image_feat_m_all: jax.Array,
                   text_feat_m_all: jax.Array, image_queue: jax.Array | dict,
                   text_queue: jax.Array | dict, queue_mask: jax.Array,
                   temperature: float | jax.Array, alpha: float | jax.Array,
                   axis_name: AxisName = None) -> tuple[jax.Array, dict]:
    """ALBEF's image-text contrastive loss with momentum targets and feature queues.

    For image i (global index r = row_offset + i) against the bank
    B^T = [text_feat_m_all; text_queue] ([G + Q, D], unfilled queue rows masked out):

        p_i = softmax(u_i . B^T / tau),   q_i = softmax(u^m_r . B^T / tau)   (no gradient)
        l_i = H(alpha q_i + (1 - alpha) onehot(r), p_i)

    and symmetrically for texts against [image_feat_m_all; image_queue];
    L = 1/(2G) sum_i (l_i^i2t + l_i^t2i) over the global batch (psum with `axis_name`).

    Args:
      image_feat, text_feat: [n, D] online (normalised) features of this device's rows.
      image_feat_m_all, text_feat_m_all: [G, D] momentum features of the whole (gathered)
        batch, replicated; row r is the momentum feature of global sample r.
      image_queue, text_queue: [Q, D] queued momentum features (or `queue_init` dicts).
      queue_mask: bool [Q], True for filled queue rows (`queue_valid_mask`).
      temperature: tau > 0; alpha: distillation weight in [0, 1].
      axis_name: None or the mesh axis the batch is split over (inside `jax.shard_map`).
    Returns:
      (loss [], dict(itc_acc_i2t, itc_acc_t2i)) over the global batch.
    """
    n = image_feat.shape[0]
    g = image_feat_m_all.shape[0]
    rows = row_offset(n, axis_name) + jnp.arange(n)
    inv_tau = 1.0 / jnp.asarray(temperature, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    sg = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    image_m_all, text_m_all = sg(image_feat_m_all), sg(text_feat_m_all)
    valid = jnp.concatenate([jnp.ones((g,), bool), queue_mask.astype(bool)])
    positive = jax.nn.one_hot(rows, valid.shape[0], dtype=jnp.float32)

    def direction(online, own_m, bank):
        logits = jnp.where(valid, online.astype(jnp.float32) @ bank.T * inv_tau, NEG_INF)
        logits_m = jnp.where(valid, own_m @ bank.T * inv_tau, NEG_INF)
        targets = jax.lax.stop_gradient(
            alpha * jax.nn.softmax(logits_m, axis=-1) + (1.0 - alpha) * positive)
        ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        return ce.sum(), jnp.sum(jnp.argmax(logits, axis=-1) == rows)

    text_bank = jnp.concatenate([text_m_all, sg(_bank(text_queue))])
    image_bank = jnp.concatenate([image_m_all, sg(_bank(image_queue))])
    ce_i2t, hit_i2t = direction(image_feat, image_m_all[rows], text_bank)
    ce_t2i, hit_t2i = direction(text_feat, text_m_all[rows], image_bank)
    global_batch = n if axis_name is None else jax.lax.psum(n, axis_name)
    loss = global_sum(ce_i2t + ce_t2i, axis_name) / (2 * global_batch)
    return loss, dict(itc_acc_i2t=global_sum(hit_i2t, axis_name) / global_batch,
                      itc_acc_t2i=global_sum(hit_t2i, axis_name) / global_batch)
