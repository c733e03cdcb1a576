"""Properties of UNITER-style per-step task sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.task_sampler import mix_losses, sample_task


def test_sample_task_frequencies_follow_ratios():
    ratios = (9.0, 12.0, 6.0, 0.0, 6.0)          # UNITER-like itm/mlm/mrfr/-/mrckl mix
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    tasks = np.asarray(jax.jit(jax.vmap(lambda k: sample_task(k, ratios)))(keys))
    assert tasks.dtype == np.int32
    counts = np.bincount(tasks, minlength=5)
    assert counts[3] == 0                         # ratio 0: never drawn
    p = np.array([r for r in ratios if r > 0]) / sum(ratios)
    observed = counts[[0, 1, 2, 4]]
    chi2 = np.sum((observed - draws * p) ** 2 / (draws * p))
    assert chi2 < 20.0, (observed, draws * p)     # 3 dof


def test_sample_task_rejects_bad_ratios():
    for bad in ((), (1.0, -1.0), (0.0, 0.0)):
        with pytest.raises(ValueError, match="task_ratios"):
            sample_task(jax.random.key(0), bad)


def test_mix_losses_runs_the_sampled_task_and_fills_metrics():
    def run(rng, x):
        fns = [lambda: (jnp.sum(x ** 2), dict(a=jnp.sum(x), shared=jnp.float32(1.0))),
               lambda: (3.0 * jnp.sum(x), dict(b=jnp.int32(7), shared=jnp.float32(2.0)))]
        return mix_losses(rng, fns, (1.0, 3.0))

    x = jnp.array([1.0, 2.0])
    f = jax.jit(jax.value_and_grad(lambda x, k: run(k, x), has_aux=True))
    seen = set()
    for seed in range(40):                      # both tasks occur among these keys
        (loss, metrics), grad = f(x, jax.random.key(seed))
        assert set(metrics) == {"a", "b", "shared", "task_id"}
        task = int(metrics["task_id"])
        seen.add(task)
        if task == 0:
            assert float(loss) == 5.0 and float(metrics["a"]) == 3.0
            assert int(metrics["b"]) == 0 and float(metrics["shared"]) == 1.0
            np.testing.assert_allclose(grad, 2 * x)
        else:
            assert float(loss) == 9.0 and int(metrics["b"]) == 7
            assert float(metrics["a"]) == 0.0 and float(metrics["shared"]) == 2.0
            np.testing.assert_allclose(grad, [3.0, 3.0])
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="task ratios"):
        mix_losses(jax.random.key(0), [lambda: (x.sum(), {})], (1.0, 2.0))
