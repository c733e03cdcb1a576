"""Properties of the contrastive losses, single-device and sharded over 8 CPU devices."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.models.dual_encoder import l2_normalize
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import shard_batch_fn


def _embeddings(n=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (l2_normalize(jax.random.normal(k1, (n, d))),
            l2_normalize(jax.random.normal(k2, (n, d))))


def _numpy_clip_loss(u, v, t):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    logits = np.exp(min(t, np.log(100.0))) * u @ v.T

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        return -(np.diag(lg) - np.log(np.exp(lg).sum(axis=1))).mean()

    return 0.5 * (ce(logits) + ce(logits.T))


def _numpy_siglip_loss(u, v, t, b):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    logits = np.exp(t) * u @ v.T + b
    z = 2 * np.eye(len(u)) - 1
    return np.sum(np.log1p(np.exp(-z * logits))) / len(u)


def test_softmax_loss_matches_numpy_reference():
    u, v = _embeddings()
    loss, metrics = softmax_contrastive_loss(u, v, jnp.array(1.5))
    chex.assert_shape(loss, ())
    chex.assert_tree_all_finite((loss, metrics))
    np.testing.assert_allclose(loss, _numpy_clip_loss(u, v, 1.5), rtol=1e-5)


def test_softmax_loss_is_symmetric_in_the_towers():
    u, v = _embeddings()
    np.testing.assert_allclose(softmax_contrastive_loss(u, v, jnp.array(2.0))[0],
                               softmax_contrastive_loss(v, u, jnp.array(2.0))[0], rtol=1e-5)


def test_softmax_loss_is_invariant_to_permuting_pairs():
    u, v = _embeddings()
    perm = np.random.default_rng(0).permutation(len(u))
    np.testing.assert_allclose(softmax_contrastive_loss(u, v, jnp.array(2.0))[0],
                               softmax_contrastive_loss(u[perm], v[perm], jnp.array(2.0))[0],
                               rtol=1e-5)


def test_perfect_alignment_with_large_scale_gives_near_zero_loss():
    u = jnp.eye(16)                                   # orthogonal, perfectly paired
    loss, metrics = softmax_contrastive_loss(u, u, jnp.log(100.0))
    assert float(loss) < 1e-6
    assert float(metrics["itc_acc_i2t"]) == 1.0


def test_temperature_is_clipped_at_100():
    u, v = _embeddings()
    a = softmax_contrastive_loss(u, v, jnp.array(10.0))[0]
    b = softmax_contrastive_loss(u, v, jnp.log(100.0))[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)     # exp(log(100)) is 100 only to ~1 ulp
    grad = jax.grad(lambda t: softmax_contrastive_loss(u, v, t)[0])(jnp.array(10.0))
    assert float(grad) == 0.0


def test_sigmoid_loss_matches_numpy_reference():
    u, v = _embeddings()
    loss, _ = sigmoid_contrastive_loss(u, v, jnp.log(10.0), jnp.array(-10.0))
    np.testing.assert_allclose(loss, _numpy_siglip_loss(u, v, np.log(10.0), -10.0), rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_loss_and_gradients_equal_single_device(kind):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    mesh = make_mesh()
    u, v = _embeddings(n=32, d=16, seed=1)
    if kind == "softmax":
        fn, args = softmax_contrastive_loss, (jnp.array(2.3),)
        sharded = shard_batch_fn(fn, mesh, 2, 1)
    else:
        fn, args = sigmoid_contrastive_loss, (jnp.array(2.3), jnp.array(-5.0))
        sharded = shard_batch_fn(fn, mesh, 2, 2)
    argnums = tuple(range(2 + len(args)))
    local_val, local_grads = jax.value_and_grad(lambda *a: fn(*a)[0], argnums)(u, v, *args)
    dist_val, dist_grads = jax.jit(jax.value_and_grad(lambda *a: sharded(*a)[0], argnums))(
        u, v, *args)
    np.testing.assert_allclose(dist_val, local_val, atol=1e-5, rtol=1e-5)
    for g_local, g_dist in zip(local_grads, dist_grads):
        np.testing.assert_allclose(g_dist, g_local, atol=1e-5)
    np.testing.assert_allclose(sharded(u, v, *args)[1]["itc_acc_i2t"],
                               fn(u, v, *args)[1]["itc_acc_i2t"])
