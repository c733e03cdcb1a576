"""Masked region modelling (UNITER, Chen et al. 2020, sec. 3.1) adapted to image patches.

UNITER masks 15% of the detector regions (features zeroed, at least one per image) and
reconstructs them from the rest and the text:

    MRFR  L = sum_{masked n} || h(v_n) - r(v_n) ||^2        (regress the input features)
    MRC   L = sum_{masked n} CE( g(v_n), argmax c(v_n) )    (the detector's class)
    MRC-kl L = sum_{masked n} KL( c(v_n) || g(v_n) )         (the detector's distribution)

(the paper's sums; the released code averages: over masked regions, and for MRC-kl also over
the K classes, see `mrc_kl_loss`).

Here the regions are patches and the frozen "detector" is a k-means codebook of raw patches
(`kmeans_codebook`): the class of a patch is its nearest centroid and its class distribution
softmax(-||x - c_k||^2 / temperature) (`codebook_targets`). Losses are averaged over the
masked patches (MRFR also over the feature elements, MRC-kl also over the K classes, as
UNITER's released code does).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mask_patches(rng: jax.Array, batch: int, num_patches: int, prob: float = 0.15
                 ) -> jax.Array:
    """bool [B, N]: each patch masked with probability `prob`; a row with none masked gets
    one uniformly chosen patch (UNITER's "at least one region")."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"patch mask probability (mrm_prob) must be in (0, 1), got {prob}")
    k_mask, k_one = jax.random.split(rng)
    mask = jax.random.uniform(k_mask, (batch, num_patches)) < prob
    one = jax.nn.one_hot(jax.random.randint(k_one, (batch,), 0, num_patches), num_patches,
                         dtype=bool)
    return jnp.where(jnp.any(mask, axis=1, keepdims=True), mask, one)


def apply_patch_mask(patches: jax.Array, mask: jax.Array) -> jax.Array:
    """Copy of patches [B, N, P] with the masked ones (mask bool [B, N]) set to zero."""
    return jnp.where(mask[..., None], jnp.zeros((), patches.dtype), patches)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def mrfr_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Masked patch feature regression: mean squared error over the masked patches' elements.

    L = sum_{b,n} m_bn ||pred_bn - target_bn||^2 / (P * max(sum m, 1)).
    pred, target [B, N, P], mask bool [B, N]. Returns (loss [], dict(mrfr_mse)).
    """
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    loss = _masked_mean(err, mask)
    return loss, dict(mrfr_mse=loss)


def mrc_loss(logits: jax.Array, teacher_ids: jax.Array, mask: jax.Array
             ) -> tuple[jax.Array, dict]:
    """Masked region classification: CE against the teacher's hard class, masked mean.

    logits [B, N, K], teacher_ids int [B, N], mask bool [B, N].
    Returns (loss [], dict(mrc_acc = accuracy over masked patches)).
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, teacher_ids.astype(jnp.int32))
    hits = (jnp.argmax(logits, -1) == teacher_ids).astype(jnp.float32)
    return _masked_mean(ce, mask), dict(mrc_acc=_masked_mean(hits, mask))


def mrc_kl_loss(logits: jax.Array, teacher_probs: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, dict]:
    """MRC-kl: KL(teacher || student) per masked patch, divided by the number of classes K.

    L = (1 / K) * sum_{b,n} m_bn KL(q_bn || p_bn) / max(sum m, 1),
    KL(q || p) = sum_k q_k (log q_k - log softmax(z)_k)  (0 log 0 = 0); q is a constant.

    The 1/K matches UNITER's released code (ChenRocks/UNITER model/pretrain.py
    `F.kl_div(log_softmax(z), q, reduction='none')` [N_masked, K], then `loss.mean()` in
    pretrain.py, i.e. the mean over regions AND classes): the loss (and its gradient) is the
    paper's per-region KL divided by K (64 for model.num_mrc_classes = 64; 1601 for UNITER's
    Visual Genome classes). The per-region KL itself is the metric `mrc_kl_per_region`
    (what UNITER's validation reports).

    logits [B, N, K], teacher_probs [B, N, K], mask bool [B, N]. Returns (loss [],
    dict(mrc_acc = agreement of the argmaxes over masked patches, mrc_kl_per_region)).
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    q = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    kl = _masked_mean(jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_p, axis=-1), mask)
    hits = (jnp.argmax(log_p, -1) == jnp.argmax(q, -1)).astype(jnp.float32)
    return kl / logits.shape[-1], dict(mrc_acc=_masked_mean(hits, mask), mrc_kl_per_region=kl)


def _sq_distances(x: jax.Array, c: jax.Array) -> jax.Array:
    """||x_i - c_k||^2 for x [..., P], c [K, P] -> [..., K] (float32, clipped at 0)."""
    d = (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, -1))
    return jnp.maximum(d, 0.0)


def _kmeans_pp_init(rng: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid is a point drawn
    with probability proportional to its squared distance to the nearest chosen one."""
    keys = jax.random.split(rng, k)
    first = x[jax.random.randint(keys[0], (), 0, x.shape[0])]
    centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
    nearest = _sq_distances(x, first[None])[:, 0]

    def body(i, state):
        centroids, nearest = state
        idx = jax.random.categorical(keys[i], jnp.log(nearest))   # log 0 = -inf: never drawn
        new = x[idx]
        nearest = jnp.minimum(nearest, _sq_distances(x, new[None])[:, 0])
        return centroids.at[i].set(new), nearest

    centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, nearest))
    return centroids


def kmeans_codebook(rng: jax.Array, patches: jax.Array, k: int, iterations: int = 10
                    ) -> jax.Array:
    """Lloyd's k-means on flattened patches [M, P] -> centroids [k, P] float32.

    Seeded by k-means++ from `rng` (deterministic given rng), then `iterations` rounds of:
    assign each patch to its nearest centroid; move each centroid to the mean of its patches
    (a centroid with no patch stays where it is).
    """
    if k < 1 or k > patches.shape[0]:
        raise ValueError(f"k-means codebook size (num_mrc_classes) must be in [1, "
                         f"{patches.shape[0]}] (the number of patches), got {k}")
    x = jax.lax.stop_gradient(patches.astype(jnp.float32))
    centroids = _kmeans_pp_init(rng, x, k)

    def lloyd(_, c):
        assign = jax.nn.one_hot(jnp.argmin(_sq_distances(x, c), -1), k, dtype=jnp.float32)
        counts = assign.sum(0)[:, None]                                     # [k, 1]
        means = (assign.T @ x) / jnp.maximum(counts, 1.0)
        return jnp.where(counts > 0, means, c)

    return jax.lax.fori_loop(0, iterations, lloyd, centroids)


def codebook_targets(patches: jax.Array, centroids: jax.Array, temperature: float = 1.0
                     ) -> tuple[jax.Array, jax.Array]:
    """Teacher targets of patches [B, N, P] from a codebook [K, P].

    ids = argmin_k ||x - c_k||^2 (int32 [B, N]); probs = softmax_k(-||x - c_k||^2 / temperature)
    (float32 [B, N, K]); both without gradient.
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"codebook temperature (mrc_temperature) must be positive, got "
                         f"{temperature}")
    x = jax.lax.stop_gradient(patches.astype(jnp.float32))
    d = _sq_distances(x, jax.lax.stop_gradient(centroids.astype(jnp.float32)))
    return jnp.argmin(d, -1).astype(jnp.int32), jax.nn.softmax(-d / temperature, axis=-1)
