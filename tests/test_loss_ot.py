"""Properties of IPOT and the word-patch alignment loss."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.ot import cosine_cost, ipot, ot_distance, wpa_loss

ipot_jit = jax.jit(ipot, static_argnames=("beta", "iterations", "k"))


def _feats(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_cosine_cost_matches_numpy():
    x, y = _feats((2, 3, 5), 0), _feats((2, 4, 5), 1)
    c = cosine_cost(x, y)
    xn = np.asarray(x) / np.linalg.norm(x, axis=-1, keepdims=True)
    yn = np.asarray(y) / np.linalg.norm(y, axis=-1, keepdims=True)
    # float32 dot products of d=5 unit vectors (values in [0, 2]) against float64: a few ulp.
    np.testing.assert_allclose(c, 1 - np.einsum("bnd,bmd->bnm", xn, yn), atol=1e-5)


def test_marginals_and_masked_entries():
    b, n, m = 3, 7, 9
    cost = cosine_cost(_feats((b, n, 8), 2), _feats((b, m, 8), 3))
    x_mask = jnp.asarray(np.arange(n)[None] < np.array([[7], [4], [5]]))
    y_mask = jnp.asarray(np.arange(m)[None] < np.array([[9], [6], [2]]))
    y_mask = y_mask.at[0, 3].set(False)                     # a hole, not only a padded tail
    plan = np.asarray(ipot_jit(cost, x_mask, y_mask))
    chex.assert_shape(plan, (b, n, m))
    xm, ym = np.asarray(x_mask), np.asarray(y_mask)
    assert np.all(plan >= 0)
    assert np.all(plan[~(xm[:, :, None] & ym[:, None, :])] == 0)   # masked: zero mass
    for i in range(b):
        np.testing.assert_allclose(plan[i].sum(1)[xm[i]], 1 / xm[i].sum(), rtol=2e-2)
        np.testing.assert_allclose(plan[i].sum(0)[ym[i]], 1 / ym[i].sum(), rtol=1e-4)
        np.testing.assert_allclose(plan[i].sum(), 1.0, rtol=1e-4)


def test_cost_is_near_the_exact_optimum_for_permutations():
    """With N = M and uniform marginals the optimum is a permutation matrix / N (Birkhoff).
    Problems of sizes 2..5 share one padded batch, which also exercises the masks."""
    sizes = np.repeat([2, 3, 4, 5], 4)
    b, n = len(sizes), 5
    cost = cosine_cost(_feats((b, n, 6), 10), _feats((b, n, 6), 11))
    mask = jnp.asarray(np.arange(n)[None] < sizes[:, None])
    got = np.asarray(ot_distance(cost, ipot_jit(cost, mask, mask)))
    c = np.asarray(cost, np.float64)
    best = np.array([min(c[i][np.arange(k), list(p)].sum() / k
                         for p in itertools.permutations(range(k)))
                     for i, k in enumerate(sizes)])
    assert np.all(got >= best - 1e-3), (got, best)
    np.testing.assert_allclose(got, best, atol=5e-3)


def test_cost_is_near_the_linear_program_optimum():
    linprog = pytest.importorskip("scipy.optimize").linprog
    n, m = 5, 8
    cost = cosine_cost(_feats((4, n, 6), 30), _feats((4, m, 6), 31))
    got = np.asarray(ot_distance(cost, ipot_jit(cost, jnp.ones((4, n), bool),
                                                jnp.ones((4, m), bool))))
    for i in range(4):
        c = np.asarray(cost[i], np.float64)
        a_eq = np.concatenate([np.kron(np.eye(n), np.ones((1, m))),
                               np.kron(np.ones((1, n)), np.eye(m))])
        b_eq = np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)])
        best = linprog(c.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None)).fun
        assert abs(got[i] - best) < 5e-3, (i, got[i], best)


def test_identical_features_have_near_zero_distance():
    x = _feats((2, 6, 16), 40)
    ones = jnp.ones((2, 6), bool)
    loss, metrics = jax.jit(wpa_loss)(x, ones, x, ones, jnp.array([True, True]))
    assert float(metrics["ot_pos"]) < 1e-3
    assert abs(float(loss)) < 1e-3


def test_no_gradient_flows_through_the_plan():
    b, l, n, d = 4, 5, 6, 8
    text, image = _feats((b, l, d), 50), _feats((b, n, d), 51)
    t_mask = jnp.asarray(np.arange(l)[None] < np.array([[5], [4], [3], [5]]))
    i_mask = jnp.ones((b, n), bool).at[:, 0].set(False)      # image CLS excluded
    pos = jnp.array([True, False, True, False])
    plan = ipot_jit(cosine_cost(text, image), t_mask, i_mask)

    def with_constant_plan(t, v):
        d_ = ot_distance(cosine_cost(t, v), plan)
        return (jnp.sum(jnp.where(pos, d_, 0.0)) - jnp.sum(jnp.where(pos, 0.0, d_))) / b

    loss_fn = lambda t, v: wpa_loss(t, t_mask, v, i_mask, pos)[0]
    # The two sides run 50 IPOT iterations in different jits (fusion order differs between
    # machines), and the loss (~0.015) is a difference of distances ~0.65: its float32 error
    # is relative to those terms, not to the small difference.
    terms = float(jnp.abs(ot_distance(cosine_cost(text, image), plan)).sum()) / b
    np.testing.assert_allclose(jax.jit(loss_fn)(text, image), with_constant_plan(text, image),
                               rtol=1e-5, atol=1e-5 * terms)
    got = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(text, image)
    want = jax.jit(jax.grad(with_constant_plan, argnums=(0, 1)))(text, image)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)    # entries up to ~0.025
    assert float(jnp.abs(got[0]).sum()) > 0
    # Gradients of a masked token are zero: it carries no mass.
    assert float(jnp.abs(got[0][2, 3:]).sum()) == 0.0
    assert float(jnp.abs(got[1][:, 0]).sum()) == 0.0


def test_wpa_loss_sign_and_metrics():
    b, l, d = 4, 5, 8
    text = _feats((b, l, d), 60)
    image = jnp.concatenate([text[:2], _feats((2, l, d), 61)])   # two aligned, two random
    ones = jnp.ones((b, l), bool)
    pos = jnp.array([True, True, False, False])
    loss, metrics = jax.jit(wpa_loss)(text, ones, image, ones, pos)
    dist = ot_distance(cosine_cost(text, image), ipot_jit(cosine_cost(text, image), ones, ones))
    np.testing.assert_allclose(metrics["ot_pos"], dist[:2].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["ot_neg"], dist[2:].mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, (dist[:2].sum() - dist[2:].sum()) / b, rtol=1e-5)
    assert float(metrics["ot_neg"]) > float(metrics["ot_pos"]) + 0.5
