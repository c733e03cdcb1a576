"""The custom-VJP rings of `contrastive_blockwise`: chunks smaller than a device's block, one
device, and per-device memory that does not grow with the number of devices at fixed rows."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.losses.contrastive_blockwise import (chunked_softmax_contrastive_loss,
                                                  ring_sigmoid_contrastive_loss)
from vlp_jax.models.dual_encoder import l2_normalize
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import shard_batch_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emb(n, d=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (l2_normalize(jax.random.normal(k1, (n, d))),
            l2_normalize(jax.random.normal(k2, (n, d))))


def _value_and_grads(fn, *args):
    return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], tuple(range(len(args)))))(*args)


def _assert_same(got, ref):
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_chunks_smaller_than_the_device_block_equal_all_gather():
    """96 rows on 8 devices (12 each), chunk 4 < 12: three chunks per visiting block."""
    mesh = make_mesh()
    u, v = _emb(96)
    t = jnp.array(2.5)
    ref = _value_and_grads(shard_batch_fn(softmax_contrastive_loss, mesh, 2, 1), u, v, t)
    got = _value_and_grads(shard_batch_fn(
        lambda a, b, c, axis_name: chunked_softmax_contrastive_loss(a, b, c, axis_name, 4),
        mesh, 2, 1), u, v, t)
    _assert_same(got, ref)


@pytest.mark.parametrize("chunk", [8, 64])
def test_one_device_chunked_softmax_equals_softmax(chunk):
    u, v = _emb(64)
    t = jnp.array(3.0)
    ref = _value_and_grads(softmax_contrastive_loss, u, v, t)
    got = _value_and_grads(lambda a, b, c: chunked_softmax_contrastive_loss(a, b, c, None, chunk),
                           u, v, t)
    _assert_same(got, ref)


def test_ring_sigmoid_large_logits_match_all_gather():
    """Scale 100 and bias +5: the softplus form stays exact where log-sigmoid saturates."""
    mesh = make_mesh()
    u, v = _emb(64, seed=3)
    args = (u, v, jnp.log(100.0), jnp.array(5.0))
    ref = _value_and_grads(shard_batch_fn(sigmoid_contrastive_loss, mesh, 2, 2), *args)
    got = _value_and_grads(shard_batch_fn(ring_sigmoid_contrastive_loss, mesh, 2, 2), *args)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


def test_chunk_must_divide_the_device_block_when_smaller():
    mesh = make_mesh()
    u, v = _emb(96)   # 12 rows per device; 8 divides 96 but not 12
    fn = shard_batch_fn(
        lambda a, b, c, axis_name: chunked_softmax_contrastive_loss(a, b, c, axis_name, 8),
        mesh, 2, 1)
    with pytest.raises(ValueError, match="chunk_size=8 must divide .* per-device batch 12"):
        fn(u, v, jnp.array(1.0))


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    from vlp_jax.losses.contrastive import softmax_contrastive_loss
    from vlp_jax.losses.contrastive_blockwise import (chunked_softmax_contrastive_loss,
                                                      ring_sigmoid_contrastive_loss)
    from vlp_jax.parallel.mesh import batch_sharding, make_mesh, replicated
    from vlp_jax.parallel.sharding import shard_batch_fn
    N, D = 128, 256
    fns = dict(
        softmax=(softmax_contrastive_loss, 1),
        chunked=(lambda u, v, t, axis_name: chunked_softmax_contrastive_loss(
            u, v, t, axis_name, 64), 1),
        ring=(ring_sigmoid_contrastive_loss, 2))
    out = {}
    for p in (8, 32):
        mesh = make_mesh(devices=jax.devices()[:p])
        for name, (fn, k) in fns.items():
            f = shard_batch_fn(fn, mesh, 2, k)
            grad = jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=tuple(range(2 + k))))
            emb = jax.ShapeDtypeStruct((N * p, D), jnp.float32, sharding=batch_sharding(mesh))
            s = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh))
            m = grad.lower(emb, emb, *([s] * k)).compile().memory_analysis()
            out[f"{name}{p}"] = (m.temp_size_in_bytes + m.argument_size_in_bytes
                                 + m.output_size_in_bytes)
    print(json.dumps(out))
""")


def test_ring_memory_is_flat_in_the_device_count():
    """Compile only, 32 simulated devices in a subprocess: at 128 rows per device, going from
    8 to 32 devices (G 1k -> 4k) grows the all-gather softmax's memory about 4-fold (n x G
    logits) and leaves the rings' unchanged (they never hold a [G, D] or n x G array)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
               " --xla_force_host_platform_device_count=32")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, ROOT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    for ring in ("chunked", "ring"):
        assert m[f"{ring}32"] <= 1.05 * m[f"{ring}8"], m
    assert m["softmax32"] >= 2.5 * m["softmax8"], m
    assert m["softmax32"] > 3 * max(m["chunked32"], m["ring32"]), m
