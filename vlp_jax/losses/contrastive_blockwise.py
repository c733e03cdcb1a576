"""Memory-bounded forms of the contrastive losses for large global batches.

The all-gather losses in `contrastive.py` materialise n x G logits per device (n local rows,
G global batch). These equal them in value and gradient with a smaller peak:

* `chunked_softmax_contrastive_loss`: log-sum-exp over column chunks of size c with a running
  (max, sum) carried through `lax.scan`; the scan body is rematerialised, so the backward
  pass recomputes each n x c block instead of storing n x G logits. Peak O(n c).
* `ring_sigmoid_contrastive_loss`: SigLIP's ring (Zhai et al. 2023, sec. 3.3): text
  embeddings travel around the batch axes with `ppermute`; at hop k each device scores its
  images against the texts of device (i - k) mod P. No device ever holds all texts. Peak O(n^2).

Both run inside `jax.shard_map` (axis_name set) or on one device (axis_name None).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.losses.contrastive import MAX_LOGIT_SCALE, inverse_temperature
from vlp_jax.nn.collectives import AxisName, all_gather, global_sum


def _chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[G, D] -> [G / c, c, D]; raises if c does not divide G."""
    g = x.shape[0]
    if chunk_size <= 0 or g % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must divide the global batch {g}")
    return x.reshape(g // chunk_size, chunk_size, x.shape[-1])


def blockwise_logsumexp(queries: jax.Array, keys: jax.Array, scale: jax.Array,
                        chunk_size: int) -> jax.Array:
    """lse_i = log sum_j exp(scale q_i.k_j) over keys in chunks: q [n, D], k [G, D] -> [n].

    Streaming log-sum-exp: m' = max(m, max_j s_ij); l' = l e^(m - m') + sum_j e^(s_ij - m').
    """
    @jax.checkpoint
    def body(carry, block):
        m, l = carry
        s = scale * queries @ block.T                       # [n, c]
        m_new = jnp.maximum(m, s.max(axis=-1))
        l = l * jnp.exp(m - m_new) + jnp.exp(s - m_new[:, None]).sum(axis=-1)
        return (m_new, l), None

    zeros = jnp.zeros_like(queries[:, 0], jnp.float32)   # inherits the queries' device variance
    init = (zeros - jnp.inf, zeros)
    (m, l), _ = jax.lax.scan(body, init, _chunks(keys, chunk_size))
    return m + jnp.log(l)


def chunked_softmax_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                                     logit_scale: jax.Array, axis_name: AxisName = None,
                                     chunk_size: int = 1024,
                                     max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """CLIP's symmetric InfoNCE with O(n * chunk_size) peak memory.

    L = 1/(2G) sum_i [(lse_j s u_i.v_j - s u_i.v_i) + (lse_j s v_i.u_j - s v_i.u_i)].
    """
    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    scale = inverse_temperature(logit_scale, max_scale)
    all_u, all_v = all_gather(u, axis_name), all_gather(v, axis_name)
    positive = scale * jnp.sum(u * v, axis=-1)                                   # [n]
    lse_i2t = blockwise_logsumexp(u, all_v, scale, min(chunk_size, all_v.shape[0]))
    lse_t2i = blockwise_logsumexp(v, all_u, scale, min(chunk_size, all_u.shape[0]))
    total = global_sum(jnp.sum(lse_i2t - positive) + jnp.sum(lse_t2i - positive), axis_name)
    return total / (2 * all_u.shape[0]), dict(inv_temperature=scale)


def ring_sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                                  logit_scale: jax.Array, logit_bias: jax.Array,
                                  axis_name: AxisName = None,
                                  max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """SigLIP loss computed as a ring over the batch axes; equals `sigmoid_contrastive_loss`.

    L = -1/G sum_i sum_j log sigmoid(z_ij (s u_i.v_j + b)), z_ij = +1 on positives only.
    """
    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    scale = inverse_temperature(logit_scale, max_scale)
    bias = logit_bias.astype(jnp.float32)
    n = u.shape[0]
    hops = 1 if axis_name is None else jax.lax.axis_size(axis_name)

    def pair_loss(texts, positive_diagonal):
        logits = scale * u @ texts.T + bias                                   # [n, n]
        z = jnp.where(positive_diagonal, 2.0 * jnp.eye(n) - 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(z * logits))

    total = pair_loss(v, True)
    if hops > 1:
        perm = [(i, (i + 1) % hops) for i in range(hops)]

        @jax.checkpoint
        def hop(carry, _):
            texts, acc = carry
            texts = jax.lax.ppermute(texts, axis_name, perm)
            return (texts, acc + pair_loss(texts, False)), None

        (_, total), _ = jax.lax.scan(hop, (v, total), None, length=hops - 1)
    global_batch = n * hops
    return global_sum(total, axis_name) / global_batch, dict(inv_temperature=scale,
                                                              logit_bias=bias)
