"""vlp_jax.nn.norm.LayerNorm computes flax's nn.LayerNorm, and its hand-written backward pass
gives autodiff's gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.nn.norm import LayerNorm


@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.bfloat16),
                                           (jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)])
def test_matches_flax_layer_norm_and_its_gradients(x_dtype, dtype):
    kx, kd, kp = jax.random.split(jax.random.key(0), 3)
    x = (3 * jax.random.normal(kx, (4, 5, 16)) + 1).astype(x_dtype)
    ours, ref = LayerNorm(1e-6, dtype), nn.LayerNorm(1e-6, dtype=dtype)
    params = ref.init(kp, x)
    params = jax.tree.map(lambda p: p + jax.random.normal(kp, p.shape, p.dtype), params)
    assert jax.tree.structure(ours.init(kp, x)) == jax.tree.structure(params)
    y, vjp = jax.vjp(lambda p, x: ours.apply(p, x), params, x)
    y_ref, vjp_ref = jax.vjp(lambda p, x: ref.apply(p, x), params, x)
    assert y.dtype == y_ref.dtype
    tol = 1e-5 if y.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), atol=tol)
    dy = jax.random.normal(kd, y.shape).astype(y.dtype)
    grads, grads_ref = vjp(dy), vjp_ref(dy)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert g.dtype == g_ref.dtype
        tol = 1e-5 if g.dtype == jnp.float32 else 5e-2
        np.testing.assert_allclose(g.astype(jnp.float32), g_ref.astype(jnp.float32),
                                   atol=tol * max(1.0, float(jnp.abs(g_ref).max())))


def test_gradient_matches_finite_differences():
    x = jax.random.normal(jax.random.key(1), (3, 8), jnp.float64 if jax.config.x64_enabled
                          else jnp.float32)
    ln = LayerNorm()
    params = ln.init(jax.random.key(2), x)
    w = jax.random.normal(jax.random.key(3), x.shape)
    f = lambda x: (ln.apply(params, x) * w).sum()
    g = jax.grad(f)(x)
    eps = 1e-2
    e = jnp.zeros_like(x).at[1, 3].set(eps)
    np.testing.assert_allclose((f(x + e) - f(x - e)) / (2 * eps), g[1, 3], rtol=2e-2, atol=2e-3)
