"""NT-Xent (SimCLR): numpy reference, properties, and the 8-device sharded form."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.simclr import nt_xent_loss
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import shard_batch_fn


def _views(n=16, d=8, seed=0, noise=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(k1, (n, d))
    return a, a + noise * jax.random.normal(k2, (n, d))


def _numpy_nt_xent(z1, z2, tau):
    """Literal SimCLR: 2G anchors, each against the 2G - 1 others, positive = its other view."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    g = len(z1)
    sim = z @ z.T / tau
    total = 0.0
    for a in range(2 * g):
        pos = (a + g) % (2 * g)
        others = [k for k in range(2 * g) if k != a]
        total += -(sim[a, pos] - np.log(np.sum(np.exp(sim[a, others]))))
    return total / (2 * g)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_matches_numpy_reference(tau):
    z1, z2 = _views()
    loss, metrics = nt_xent_loss(z1, z2, tau)
    chex.assert_shape(loss, ())
    chex.assert_tree_all_finite((loss, metrics))
    np.testing.assert_allclose(loss, _numpy_nt_xent(np.asarray(z1), np.asarray(z2), tau),
                               rtol=1e-5)


def test_symmetric_in_views_and_invariant_to_permuting_images():
    z1, z2 = _views()
    base = nt_xent_loss(z1, z2)[0]
    np.testing.assert_allclose(nt_xent_loss(z2, z1)[0], base, rtol=1e-5)   # sums reordered
    perm = np.random.default_rng(0).permutation(len(z1))
    np.testing.assert_allclose(nt_xent_loss(z1[perm], z2[perm])[0], base, rtol=1e-5)


def test_scale_invariant_inputs():
    z1, z2 = _views()
    np.testing.assert_allclose(nt_xent_loss(3.0 * z1, 0.5 * z2)[0], nt_xent_loss(z1, z2)[0],
                               rtol=1e-5)


def test_identical_orthogonal_views_give_near_zero_loss_and_full_accuracy():
    z = jnp.eye(16)
    loss, metrics = nt_xent_loss(z, z, 0.05)
    assert float(loss) < 1e-6
    assert float(metrics["ssl_acc"]) == 1.0


def test_swapped_positives_raise_the_loss():
    z1, z2 = _views(noise=0.1)
    good = nt_xent_loss(z1, z2)[0]
    bad = nt_xent_loss(z1, jnp.roll(z2, 1, axis=0))[0]
    assert float(bad) > float(good) + 1.0


def test_rejects_non_positive_temperature():
    z1, z2 = _views()
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, 0.0)


def test_sharded_loss_and_gradients_equal_single_device_on_8_devices():
    assert jax.device_count() == 8
    mesh = make_mesh()
    z1, z2 = _views(n=32, d=8, seed=3)
    sharded = shard_batch_fn(lambda a, b, axis_name: nt_xent_loss(a, b, 0.1, axis_name), mesh, 2)

    def global_loss(a, b):
        return nt_xent_loss(a, b, 0.1)[0]

    def split_loss(a, b):
        return sharded(a, b)[0]

    ref, ref_grads = jax.value_and_grad(global_loss, argnums=(0, 1))(z1, z2)
    out, grads = jax.jit(jax.value_and_grad(split_loss, argnums=(0, 1)))(z1, z2)
    np.testing.assert_allclose(out, ref, rtol=1e-5)      # per-shard partial sums, then psum
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    acc_ref = nt_xent_loss(z1, z2, 0.1)[1]["ssl_acc"]
    np.testing.assert_allclose(sharded(z1, z2)[1]["ssl_acc"], acc_ref)
