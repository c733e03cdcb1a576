"""The chunked softmax loss and the SigLIP ring equal the all-gather losses (value, gradient)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.losses.contrastive_blockwise import (blockwise_logsumexp,
                                                  chunked_softmax_contrastive_loss,
                                                  ring_sigmoid_contrastive_loss)
from vlp_jax.models.dual_encoder import l2_normalize
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import shard_batch_fn


def _emb(n=64, d=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (l2_normalize(jax.random.normal(k1, (n, d))),
            l2_normalize(jax.random.normal(k2, (n, d))))


def test_blockwise_logsumexp_matches_dense():
    u, v = _emb()
    dense = jax.nn.logsumexp(7.0 * u @ v.T, axis=-1)
    np.testing.assert_allclose(blockwise_logsumexp(u, v, 7.0, 16), dense, rtol=1e-5)


def test_chunk_size_must_divide_the_batch():
    u, v = _emb()
    with pytest.raises(ValueError, match="chunk_size=24 must divide"):
        chunked_softmax_contrastive_loss(u, v, jnp.array(1.0), chunk_size=24)


def _value_and_grads(fn, *args):
    return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_softmax_equals_all_gather_on_8_devices(chunk):
    mesh = make_mesh()
    u, v = _emb()
    t = jnp.array(2.5)
    ref = _value_and_grads(shard_batch_fn(softmax_contrastive_loss, mesh, 2, 1), u, v, t)
    chunked = shard_batch_fn(
        lambda a, b, c, axis_name: chunked_softmax_contrastive_loss(a, b, c, axis_name, chunk),
        mesh, 2, 1)
    got = _value_and_grads(chunked, u, v, t)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_ring_sigmoid_equals_all_gather_on_8_devices():
    mesh = make_mesh()
    u, v = _emb()
    args = (u, v, jnp.log(10.0), jnp.array(-4.0))
    ref = _value_and_grads(shard_batch_fn(sigmoid_contrastive_loss, mesh, 2, 2), *args)
    got = _value_and_grads(shard_batch_fn(ring_sigmoid_contrastive_loss, mesh, 2, 2), *args)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, atol=1e-5)
    single = _value_and_grads(ring_sigmoid_contrastive_loss, *args)
    np.testing.assert_allclose(single[0], ref[0], rtol=1e-5)
