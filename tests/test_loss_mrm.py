"""Properties of masked patch modelling: masking, MRFR / MRC / MRC-kl and the k-means teacher."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.losses import mrm
from vlp_jax.losses.mrm import apply_patch_mask, kmeans_codebook, mask_patches

# Jitted once per shape: one compilation instead of one per eager op keeps the file fast.
mrfr_loss, mrc_loss, mrc_kl_loss = (jax.jit(f) for f in (mrm.mrfr_loss, mrm.mrc_loss,
                                                          mrm.mrc_kl_loss))
codebook_targets = jax.jit(mrm.codebook_targets)
_RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return jnp.asarray(_RNG.normal(size=shape) * scale, jnp.float32)


def _mask(b, n, p):
    m = _RNG.random((b, n)) < p
    m[np.arange(b), _RNG.integers(0, n, b)] = True
    return jnp.asarray(m)


def test_mask_rate_and_at_least_one_per_row():
    mask = np.asarray(jax.jit(mask_patches, static_argnums=(1, 2, 3))(
        jax.random.key(0), 2000, 64, 0.15))
    chex.assert_shape(mask, (2000, 64))
    assert mask.dtype == bool
    assert np.all(mask.any(1))
    assert abs(mask.mean() - 0.15) < 0.005, mask.mean()
    tiny = np.asarray(jax.jit(mask_patches, static_argnums=(1, 2, 3))(
        jax.random.key(1), 500, 4, 0.01))                      # mostly the floor
    np.testing.assert_array_equal(tiny.sum(1) >= 1, True)
    assert tiny.sum(1).mean() < 1.1


def test_apply_patch_mask_zeroes_only_masked():
    patches = _normal(3, 10, 6) + 5.0
    mask = _mask(3, 10, 0.3)
    out = np.asarray(apply_patch_mask(patches, mask))
    m = np.asarray(mask)
    assert np.all(out[m] == 0)
    np.testing.assert_array_equal(out[~m], np.asarray(patches)[~m])


def test_mrfr_loss_numpy_reference_and_perfect_prediction():
    pred, target = _normal(4, 9, 5), _normal(4, 9, 5)
    mask = _mask(4, 9, 0.3)
    loss, metrics = mrfr_loss(pred, target, mask)
    m = np.asarray(mask)
    ref = ((np.asarray(pred) - np.asarray(target)) ** 2)[m].mean()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["mrfr_mse"], ref, rtol=1e-5)
    assert float(mrfr_loss(target, target, mask)[0]) == 0.0
    # Unmasked patches do not matter.
    noisy = jnp.where(mask[..., None], target, target + 100.0)
    assert float(mrfr_loss(noisy, target, mask)[0]) == 0.0


def test_mrc_losses():
    logits = _normal(3, 8, 7, scale=2.0)
    t = np.exp(_RNG.normal(size=(3, 8, 7)) * 2)
    teacher = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    ids = jnp.asarray(_RNG.integers(0, 7, (3, 8)), jnp.int32)
    mask = _mask(3, 8, 0.4)
    m = np.asarray(mask)
    z = np.asarray(logits, np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce_ref = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0][m].mean()
    ce, metrics = mrc_loss(logits, ids, mask)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5)
    assert 0.0 <= float(metrics["mrc_acc"]) <= 1.0
    q = np.asarray(teacher)
    # UNITER's reduction: the mean of kl_div(reduction='none') over masked regions AND the
    # K = 7 classes, i.e. the per-region KL / K.
    kl_elements = (q * (np.log(q) - logp))[m]                 # [N_masked, K]
    kl_ref = kl_elements.mean()
    kl, kl_metrics = mrc_kl_loss(logits, teacher, mask)
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-4)
    np.testing.assert_allclose(kl_metrics["mrc_kl_per_region"], kl_elements.sum(-1).mean(),
                               rtol=1e-4)
    assert float(kl) > 0.0
    zero, zero_metrics = mrc_kl_loss(jnp.asarray(np.log(teacher)), teacher, mask)
    assert abs(float(zero)) < 1e-5
    assert float(zero_metrics["mrc_acc"]) == 1.0
    one_hot = jnp.asarray(np.eye(7)[np.asarray(ids)])   # 0 log 0 terms are handled
    kl_hard, _ = mrc_kl_loss(logits, one_hot, mask)
    np.testing.assert_allclose(kl_hard * 7, ce, rtol=1e-5)


def _clusters(seed=8, k=5, per=40, p=12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, p)) * 10.0
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + rng.normal(size=(k * per, p)) * 0.1
    perm = rng.permutation(k * per)
    return jnp.asarray(x[perm], jnp.float32), labels[perm], centers


def test_kmeans_separates_well_separated_clusters_exactly():
    x, labels, centers = _clusters()
    fit = jax.jit(kmeans_codebook, static_argnums=(2, 3))
    for seed in range(5):
        c = np.asarray(fit(jax.random.key(seed), x, 5, 10))
        chex.assert_shape(c, (5, 12))
        assign = np.argmin(((np.asarray(x)[:, None] - c[None]) ** 2).sum(-1), 1)
        # A bijection between found clusters and true ones, with every point in its cluster.
        mapping = {}
        for a, t in zip(assign, labels):
            assert mapping.setdefault(a, t) == t
        assert len(mapping) == 5
        for a, t in mapping.items():
            np.testing.assert_allclose(c[a], np.asarray(x)[labels == t].mean(0), atol=1e-3)
    a = fit(jax.random.key(3), x, 5, 10)
    chex.assert_trees_all_equal(a, fit(jax.random.key(3), x, 5, 10))   # deterministic


def test_codebook_targets_are_the_nearest_centroids():
    x, _, _ = _clusters(seed=9)
    c = jax.jit(kmeans_codebook, static_argnums=(2, 3))(jax.random.key(0), x, 5, 10)
    patches = x.reshape(8, 25, 12)
    ids, probs = codebook_targets(patches, c, temperature=2.0)
    chex.assert_shape((ids, probs), ((8, 25), (8, 25, 5)))
    d = ((np.asarray(patches)[..., None, :] - np.asarray(c)) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, d.argmin(-1))
    e = np.exp(-(d - d.min(-1, keepdims=True)) / 2.0)
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
