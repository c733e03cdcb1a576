"""NT-Xent, the normalised-temperature cross-entropy of SimCLR (Chen et al. 2020, eq. 1),
written once for one device or for a mesh axis (the `axis_name` pattern of
`vlp_jax.losses.contrastive`).

For G images seen as two views, z = [z^1_1 .. z^1_G, z^2_1 .. z^2_G] (2G unit vectors), the loss
of anchor a with positive p(a) (the other view of the same image) is

    l(a) = -log  exp(sim(z_a, z_p(a)) / tau) / sum_{k != a} exp(sim(z_a, z_k) / tau)

with sim the cosine similarity, and L = 1/(2G) sum_a l(a): every other view in the global batch,
of either augmentation, is a negative. SLIP (Mu et al. 2022) uses tau = 0.1.

With `axis_name` set the function runs inside `jax.shard_map` with the batch split over that
axis: each device holds n = G / devices rows of both views, gathers both views of every device
(tiled all-gather, so gradients flow back to the owner) and the loss is the global one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlp_jax.nn.collectives import AxisName, all_gather, global_sum, l2_normalize, row_offset

NEG_INF = -1e9   # finite "minus infinity": masked logits, safe under autodiff


def nt_xent_loss(view1: jax.Array, view2: jax.Array, temperature: float = 0.1,
                 axis_name: AxisName = None) -> tuple[jax.Array, dict]:
    """SimCLR's NT-Xent between two views of the same images.

    Args:
      view1, view2: [n, D] projections of the two views (local rows; not necessarily unit
        norm: they are L2-normalised here, as SimCLR's cosine similarity).
      temperature: tau > 0 (a fixed hyperparameter, not learned).
      axis_name: None (one device / global view) or the mesh axis the batch is split over.
    Returns:
      (loss [], metrics dict(ssl_acc = fraction of anchors whose most similar other view is
      their positive)).
    """
    if temperature <= 0:
        raise ValueError(f"NT-Xent temperature must be positive, got {temperature}")
    z1, z2 = l2_normalize(view1), l2_normalize(view2)
    n = z1.shape[0]
    all1, all2 = all_gather(z1, axis_name), all_gather(z2, axis_name)         # [G, D] each
    g = all1.shape[0]
    rows = row_offset(n, axis_name) + jnp.arange(n)                    # global ids [n]
    self_mask = jax.nn.one_hot(rows, g, dtype=bool)                      # [n, G]

    def anchor_ce(z, same_view, other_view):
        """Anchors z [n, D]; logits over [same view (self masked) | other view]: [n, 2G]."""
        same = jnp.where(self_mask, NEG_INF, z @ same_view.T / temperature)
        logits = jnp.concatenate([same, z @ other_view.T / temperature], axis=1)
        labels = g + rows                                                # the other view
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        hits = jnp.argmax(logits, axis=-1) == labels
        return ce.sum(), hits.sum()

    ce1, hit1 = anchor_ce(z1, all1, all2)
    ce2, hit2 = anchor_ce(z2, all2, all1)
    loss = global_sum(ce1 + ce2, axis_name) / (2 * g)
    acc = global_sum(hit1 + hit2, axis_name) / (2 * g)
    return loss, dict(ssl_acc=acc)
