"""Properties of ALBEF's momentum distillation pieces: EMA, ramp, queue and ITC with queue."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.contrastive import softmax_contrastive_loss
from vlp_jax.losses.distill import (distill_alpha, itc_with_queue, queue_init, queue_push,
                                    queue_valid_mask, soft_cross_entropy)
from vlp_jax.objectives.teacher import ema_update
from vlp_jax.models.dual_encoder import l2_normalize
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import shard_batch_fn


def test_ema_arithmetic():
    teacher = dict(w=jnp.array([1.0, 2.0]), b=jnp.array(4.0, jnp.bfloat16),
                   step=jnp.array(3, jnp.int32))
    student = dict(w=jnp.array([3.0, 6.0]), b=jnp.array(0.0, jnp.bfloat16),
                   step=jnp.array(7, jnp.int32))
    out = ema_update(teacher, student, 0.75)
    np.testing.assert_allclose(out["w"], [1.5, 3.0])
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"]) == 3.0
    assert int(out["step"]) == 7
    chex.assert_trees_all_close(ema_update(teacher, student, 0.0)["w"], student["w"])


def test_soft_cross_entropy():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    q = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 3, 5)))
    out = soft_cross_entropy(logits, q)
    chex.assert_shape(out, (2, 3))
    z = np.asarray(logits, np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(out, -(np.asarray(q) * logp).sum(-1), rtol=1e-5)


def test_distill_alpha_ramp():
    assert float(distill_alpha(0, 0.4, 100)) == 0.0
    np.testing.assert_allclose(distill_alpha(50, 0.4, 100), 0.2, rtol=1e-6)
    np.testing.assert_allclose(distill_alpha(100, 0.4, 100), 0.4, rtol=1e-6)
    np.testing.assert_allclose(distill_alpha(10_000, 0.4, 100), 0.4, rtol=1e-6)
    np.testing.assert_allclose(distill_alpha(0, 0.4, 0), 0.4, rtol=1e-6)     # no ramp
    np.testing.assert_allclose(jax.jit(distill_alpha, static_argnums=(1, 2))(
        jnp.int32(25), 0.4, 100), 0.1, rtol=1e-6)


def test_queue_ring_buffer_order_and_wrap_around():
    q = queue_init(6, 2)
    assert q["feats"].shape == (6, 2) and int(q["ptr"]) == 0 and int(q["filled"]) == 0
    assert not np.any(queue_valid_mask(q))
    push = jax.jit(queue_push)
    batches = [jnp.full((2, 2), float(i + 1)) for i in range(5)]
    q = push(q, batches[0])
    np.testing.assert_array_equal(queue_valid_mask(q), [1, 1, 0, 0, 0, 0])
    q = push(push(q, batches[1]), batches[2])
    np.testing.assert_array_equal(q["feats"][:, 0], [1, 1, 2, 2, 3, 3])
    assert int(q["ptr"]) == 0 and int(q["filled"]) == 6
    q = push(q, batches[3])                                   # wraps: overwrites the oldest
    np.testing.assert_array_equal(q["feats"][:, 0], [4, 4, 2, 2, 3, 3])
    q = push(q, batches[4])
    np.testing.assert_array_equal(q["feats"][:, 0], [4, 4, 5, 5, 3, 3])
    assert int(q["ptr"]) == 4 and int(q["filled"]) == 6
    assert np.all(queue_valid_mask(q))
    with pytest.raises(ValueError, match="queue_size"):
        queue_push(q, jnp.zeros((7, 2)))


def test_queue_wraps_batches_that_do_not_divide_its_size():
    q = queue_init(5, 1)
    for i in range(4):                                        # pushes of 2 into 5 rows
        q = jax.jit(queue_push)(q, jnp.full((2, 1), float(i + 1)))
        if i == 1:
            np.testing.assert_array_equal(queue_valid_mask(q), [1, 1, 1, 1, 0])
    # rows: [1 1 2 2 -] -> [3 1 2 2 3] -> [3 4 4 2 3]
    np.testing.assert_array_equal(q["feats"][:, 0], [3, 4, 4, 2, 3])
    assert int(q["ptr"]) == 3 and int(q["filled"]) == 5


def _feats(n, d, seed):
    return l2_normalize(jax.random.normal(jax.random.key(seed), (n, d)))


def _numpy_itc(u, w, um, wm, iq, tq, qmask, tau, alpha):
    u, w, um, wm, iq, tq = (np.asarray(a, np.float64) for a in (u, w, um, wm, iq, tq))
    g = len(u)
    valid = np.concatenate([np.ones(g, bool), np.asarray(qmask)])

    def one(online, own_m, bank):
        bank = bank[valid]
        lg, lm = online @ bank.T / tau, own_m @ bank.T / tau
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        q = np.exp(lm) / np.exp(lm).sum(1, keepdims=True)
        y = np.eye(g, len(bank))
        return -((alpha * q + (1 - alpha) * y) * logp).sum(1).mean()

    return 0.5 * (one(u, um, np.concatenate([wm, tq])) + one(w, wm, np.concatenate([um, iq])))


def _itc_inputs(g=16, d=8, q=12, filled=7):
    u, w = _feats(g, d, 1), _feats(g, d, 2)
    um = l2_normalize(u + 0.3 * _feats(g, d, 3))
    wm = l2_normalize(w + 0.3 * _feats(g, d, 4))
    iq, tq = _feats(q, d, 5), _feats(q, d, 6)
    qmask = jnp.arange(q) < filled
    return u, w, um, wm, iq, tq, qmask


def test_itc_with_queue_matches_numpy_reference():
    args = _itc_inputs()
    loss, metrics = jax.jit(itc_with_queue)(*args, 0.07, 0.4)
    np.testing.assert_allclose(loss, _numpy_itc(*args, 0.07, 0.4), rtol=1e-5)
    assert 0.0 <= float(metrics["itc_acc_i2t"]) <= 1.0
    # Unfilled queue rows do not matter, whatever they hold.
    u, w, um, wm, iq, tq, qmask = args
    garbage = jnp.where(qmask[:, None], iq, 100.0)
    loss2, _ = jax.jit(itc_with_queue)(u, w, um, wm, garbage, tq, qmask, 0.07, 0.4)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    # The queue may also be passed as the `queue_init` dict.
    qd = lambda f: dict(feats=f, ptr=jnp.int32(0), filled=jnp.int32(7))
    loss3, _ = itc_with_queue(u, w, um, wm, qd(iq), qd(tq), qmask, 0.07, 0.4)
    np.testing.assert_allclose(loss3, loss, rtol=1e-5)      # eager vs jitted reductions


def test_itc_without_queue_and_distillation_is_clip():
    u, w = _feats(16, 8, 7), _feats(16, 8, 8)
    empty = jnp.zeros((8, 8))
    loss, _ = itc_with_queue(u, w, u, w, empty, empty, jnp.zeros(8, bool), 0.07, 0.0)
    ref, _ = softmax_contrastive_loss(u, w, jnp.log(1 / 0.07))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_itc_with_queue_sharded_equals_global_and_gradients():
    mesh = make_mesh()
    args = _itc_inputs(g=16)
    sharded = shard_batch_fn(itc_with_queue, mesh, 2, 7)
    tau, alpha = jnp.float32(0.07), jnp.float32(0.4)
    loss_s, metrics_s = jax.jit(sharded)(*args, tau, alpha)
    loss_g, metrics_g = itc_with_queue(*args, tau, alpha)
    np.testing.assert_allclose(loss_s, loss_g, rtol=1e-5)
    chex.assert_trees_all_close(metrics_s, metrics_g, rtol=1e-5)
    grad_s = jax.jit(jax.grad(lambda u, w, t: sharded(u, w, *args[2:], t, alpha)[0],
                              argnums=(0, 1, 2)))(args[0], args[1], tau)
    grad_g = jax.grad(lambda u, w, t: itc_with_queue(u, w, *args[2:], t, alpha)[0],
                      argnums=(0, 1, 2))(args[0], args[1], tau)
    chex.assert_trees_all_close(grad_s, grad_g, rtol=1e-4, atol=1e-6)
