"""Properties of ITM negative sampling and the ITM loss (single device and 8-way shard_map)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vlp_jax.losses.itm import hard_negative_indices, itm_loss, random_negative_indices
from vlp_jax.parallel.mesh import make_mesh


def _draws(sim, draws=4000, seed=0):
    """[draws, n] negative texts for images (sim_i2t = sim) and images for texts (sim_t2i = sim)."""
    keys = jax.random.split(jax.random.key(seed), draws)
    f = jax.jit(jax.vmap(lambda k: hard_negative_indices(k, sim, sim)))
    return tuple(np.asarray(a) for a in f(keys))


def test_hard_negatives_never_draw_the_positive():
    sim = 20.0 * jnp.eye(6) + jax.random.normal(jax.random.key(1), (6, 6))  # positive dominates
    neg_text, neg_image = _draws(sim)
    chex.assert_shape(neg_text, (4000, 6))
    assert neg_text.dtype == np.int32
    for idx in (neg_text, neg_image):
        assert np.all((idx >= 0) & (idx < 6))
        assert not np.any(idx == np.arange(6)[None])


def test_hard_negative_frequencies_follow_softmax_over_negatives():
    n, draws = 5, 20000
    sim = jax.random.normal(jax.random.key(2), (n, n)) * 1.5
    neg_text, _ = _draws(sim, draws)
    s = np.asarray(sim, np.float64)
    for i in range(n):
        w = np.exp(s[i])
        w[i] = 0.0
        expected = draws * w / w.sum()
        observed = np.bincount(neg_text[:, i], minlength=n).astype(np.float64)
        others = np.arange(n) != i
        chi2 = np.sum((observed[others] - expected[others]) ** 2 / expected[others])
        # 3 degrees of freedom: P(chi2 > 20) ~ 2e-4.
        assert chi2 < 20.0, (i, observed, expected)


def test_hard_negatives_concentrate_on_the_most_similar():
    n = 8
    base = np.zeros((n, n), np.float32)
    hard = (np.arange(n) + 3) % n            # one very similar non-matching text per image
    base[np.arange(n), hard] = 8.0
    neg_text, neg_image = _draws(jnp.asarray(base), draws=500)
    assert np.mean(neg_text == hard[None]) > 0.95
    assert np.mean(neg_image == hard[None]) > 0.95


def test_hard_negatives_are_valid_global_indices_and_differ_across_devices():
    mesh = make_mesh()
    devices, n = mesh.shape["data"], 4
    g = devices * n
    sim = jnp.zeros((g, g))                  # uniform weights: only the key decides the draws

    def body(si, st):
        return hard_negative_indices(jax.random.key(0), si, st, axis_name="data")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=(P("data"), P("data")), check_vma=True))
    neg_text, neg_image = (np.asarray(a) for a in f(sim, sim))
    chex.assert_shape(neg_text, (g,))
    for idx in (neg_text, neg_image):
        assert np.all((idx >= 0) & (idx < g))
        assert not np.any(idx == np.arange(g))          # global positive excluded
        # Without folding the device index in, every device would use the same Gumbel noise
        # and draw (almost always) the same global indices; independent draws agree with
        # probability about 1 / (g - 1).
        per_device = idx.reshape(devices, n)
        same = [np.mean(per_device[a] == per_device[b])
                for a in range(devices) for b in range(a + 1, devices)]
        assert np.mean(same) < 0.3, same
    # The positive of device d's row i is global column d*n + i, so draws of a device with a
    # strongly similar column next to its positive land there: a second check of the offset.
    hard = (np.arange(g) + 1) % g
    sim2 = np.zeros((g, g), np.float32)
    sim2[np.arange(g), hard] = 12.0
    neg_text, _ = (np.asarray(a) for a in f(jnp.asarray(sim2), jnp.asarray(sim2)))
    assert np.mean(neg_text == hard) > 0.9


def test_random_negatives_are_uniform_over_others():
    draws, n, g = 6000, 3, 6
    keys = jax.random.split(jax.random.key(3), draws)
    idx = np.asarray(jax.vmap(lambda k: random_negative_indices(k, n, g, 2))(keys))
    own = 2 + np.arange(n)
    assert np.all((idx >= 0) & (idx < g))
    assert not np.any(idx == own[None])
    counts = np.bincount(idx[:, 0], minlength=g)
    expected = draws / (g - 1)
    others = np.arange(g) != own[0]
    assert np.sum((counts[others] - expected) ** 2 / expected) < 20.0   # 4 dof


def test_itm_loss_matches_numpy_reference():
    logits = jax.random.normal(jax.random.key(4), (12, 2)) * 2
    labels = jnp.asarray([1, 0, 0] * 4, jnp.int32)
    loss, metrics = itm_loss(logits, labels)
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z).sum(1))
    ref = np.mean(lse - z[np.arange(12), np.asarray(labels)])
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["itm_acc"],
                               np.mean(z.argmax(1) == np.asarray(labels)), rtol=1e-6)
    perfect = 10.0 * jax.nn.one_hot(labels, 2)
    assert float(itm_loss(perfect, labels)[1]["itm_acc"]) == 1.0
