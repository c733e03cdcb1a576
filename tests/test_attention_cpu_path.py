"""The heads-major attention used on CPU computes jax.nn.dot_product_attention's function."""
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.nn.attention import (MultiHeadAttention, causal_mask, heads_major_attention,
                                  make_attention_mask)


def _qkv(b=3, q=7, k=7, h=4, d=8):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (b, n, h, d)) for kk, n in zip(keys, (q, k, k))]


def _padding_causal_mask(lengths, length):
    valid = jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]
    return make_attention_mask(valid, valid) & causal_mask(length)


def test_matches_dot_product_attention_with_masks_and_gradients():
    q, k, v = _qkv()
    mask = _padding_causal_mask([7, 4, 0], 7)       # the last example: every row fully masked
    for m in (None, mask):
        ref = jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
        np.testing.assert_allclose(heads_major_attention(q, k, v, m), ref, atol=1e-5)

        def loss(f):
            return lambda q, k, v: (f(q, k, v) ** 2).sum()
        g_ref = jax.jit(jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=m, implementation="xla")), argnums=(0, 1, 2)))(q, k, v)
        g_new = jax.jit(jax.grad(loss(lambda q, k, v: heads_major_attention(q, k, v, m)),
                                 argnums=(0, 1, 2)))(q, k, v)
        for a, b in zip(g_new, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_cross_attention_lengths():
    q, k, v = _qkv(q=5, k=9)
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(heads_major_attention(q, k, v, None), ref, atol=1e-5)


def test_module_default_on_cpu_equals_xla_implementation():
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    mask = _padding_causal_mask([6, 3], 6)
    default, xla = MultiHeadAttention(4), MultiHeadAttention(4, implementation="xla")
    params = default.init(jax.random.key(2), x, mask=mask)
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(default.apply(params, x, mask=mask),
                               xla.apply(params, x, mask=mask), atol=1e-5)


def test_custom_backward_cross_attention_and_bfloat16():
    """The hand-written backward pass against autodiff of the xla path: Q != K lengths with a
    padding mask, and bfloat16 inputs (gradients come back in the inputs' dtypes)."""
    q, k, v = _qkv(q=5, k=9)
    mask = make_attention_mask(jnp.ones((3, 5), bool), jnp.arange(9)[None] < jnp.array([[9], [2], [0]]))
    for dtype, atol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)):
        args = [x.astype(dtype) for x in (q, k, v)]

        def loss(f):
            return lambda q, k, v: (f(q, k, v).astype(jnp.float32) ** 2).sum()
        g_ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation="xla")), argnums=(0, 1, 2))(*args)
        g_new = jax.grad(loss(lambda q, k, v: heads_major_attention(q, k, v, mask)),
                         argnums=(0, 1, 2))(*args)
        for a, b in zip(g_new, g_ref):
            assert a.dtype == dtype
            np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=atol)
