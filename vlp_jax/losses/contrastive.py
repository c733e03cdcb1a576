"""Image-text contrastive losses (ITC), written once for one device or for a mesh axis.

Every function takes `axis_name`: None computes on the arrays it is given (one device, or
the global view); a mesh axis name (or tuple of names) means it runs inside `jax.shard_map`
with the batch split over that axis, gathers the *other* tower's embeddings across devices
and returns exactly the loss of the global batch. Embeddings are assumed L2-normalised.

Shapes: image_emb, text_emb [n, D] local rows (n = B / devices); G = global batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlp_jax.nn.collectives import AxisName, all_gather, global_sum, row_offset

MAX_LOGIT_SCALE = 100.0


def inverse_temperature(logit_scale: jax.Array, max_scale: float = MAX_LOGIT_SCALE) -> jax.Array:
    """exp(t) clipped at `max_scale` (CLIP clamps the learnable t to [0, ln 100])."""
    return jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), jnp.log(max_scale)))


def softmax_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                             axis_name: AxisName = None,
                             max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021) / ALIGN (Jia et al. 2021).

    L = 1/(2G) sum_i [ -log softmax_j(s u_i.v_j)[i] - log softmax_j(s v_i.u_j)[i] ],
    s = exp(t) <= max_scale. Returns (loss [], metrics) with i2t / t2i top-1 accuracy over
    the global batch.
    """
    image_emb = image_emb.astype(jnp.float32)
    text_emb = text_emb.astype(jnp.float32)
    n = image_emb.shape[0]
    scale = inverse_temperature(logit_scale, max_scale)
    labels = row_offset(n, axis_name) + jnp.arange(n)
    logits_i2t = scale * image_emb @ all_gather(text_emb, axis_name).T   # [n, G]
    logits_t2i = scale * text_emb @ all_gather(image_emb, axis_name).T   # [n, G]
    ce = (optax.softmax_cross_entropy_with_integer_labels(logits_i2t, labels).sum()
          + optax.softmax_cross_entropy_with_integer_labels(logits_t2i, labels).sum())
    global_batch = n if axis_name is None else jax.lax.psum(n, axis_name)
    loss = global_sum(ce, axis_name) / (2 * global_batch)
    acc_i2t = global_sum(jnp.sum(jnp.argmax(logits_i2t, -1) == labels), axis_name) / global_batch
    acc_t2i = global_sum(jnp.sum(jnp.argmax(logits_t2i, -1) == labels), axis_name) / global_batch
    return loss, dict(itc_acc_i2t=acc_i2t, itc_acc_t2i=acc_t2i, inv_temperature=scale)


def sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                             logit_bias: jax.Array, axis_name: AxisName = None,
                             max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1), all-gather form.

    L = -1/G sum_i sum_j log sigmoid(z_ij (s u_i.v_j + b)), z_ij = 1 if i == j else -1.
    Returns (loss [], metrics).
    """
    image_emb = image_emb.astype(jnp.float32)
    text_emb = text_emb.astype(jnp.float32)
    n = image_emb.shape[0]
    scale = inverse_temperature(logit_scale, max_scale)
    bias = logit_bias.astype(jnp.float32)
    all_text = all_gather(text_emb, axis_name)                              # [G, D]
    logits = scale * image_emb @ all_text.T + bias                      # [n, G]
    labels = row_offset(n, axis_name) + jnp.arange(n)
    z = 2.0 * jax.nn.one_hot(labels, all_text.shape[0]) - 1.0
    global_batch = all_text.shape[0]
    loss = -global_sum(jnp.sum(jax.nn.log_sigmoid(z * logits)), axis_name) / global_batch
    acc = global_sum(jnp.sum(jnp.argmax(logits, -1) == labels), axis_name) / global_batch
    return loss, dict(itc_acc_i2t=acc, inv_temperature=scale, logit_bias=bias)
