"""Memory-bounded forms of the contrastive losses for large global batches.

The all-gather losses in `contrastive.py` materialise n x G logits per device (n local rows,
G global batch), and their backward pass holds the gathered [G, D] embeddings and cotangents.
These equal them in value and gradient with a peak that does not grow with G at fixed n:

* `chunked_softmax_contrastive_loss`: CLIP's InfoNCE as a ring. Both towers' local blocks
  [n, D] travel around the batch axes with `ppermute`; at hop k each device folds the scores of
  its images against the visiting texts (and of its texts against the visiting images) into a
  running (max, sum) log-sum-exp, in column chunks of c <= n. The backward pass is a custom
  VJP that runs the ring again with the blocks' gradient accumulators travelling with them
  (as ring attention does), so only O(n D) embeddings and one n x c block exist at a time.
  Without an axis (one device) it is a blockwise log-sum-exp over column chunks of the batch.
* `ring_sigmoid_contrastive_loss`: SigLIP's ring (Zhai et al. 2023, sec. 3.3): text
  embeddings travel around the batch axes with `ppermute`; at hop k each device scores its
  images against the texts of device (i - k) mod P. Custom VJP: the backward ring recomputes
  each n x n block and carries the texts' gradients home. Peak O(n^2 + n D).

Both run inside `jax.shard_map` (axis_name set) or on one device (axis_name None).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlp_jax.losses.contrastive import MAX_LOGIT_SCALE, inverse_temperature
from vlp_jax.nn.collectives import AxisName, global_sum


def _chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[G, D] -> [G / c, c, D]; raises if c does not divide G."""
    g = x.shape[0]
    if chunk_size <= 0 or g % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must divide the global batch {g}")
    return x.reshape(g // chunk_size, chunk_size, x.shape[-1])


def blockwise_logsumexp(queries: jax.Array, keys: jax.Array, scale: jax.Array,
                        chunk_size: int) -> jax.Array:
    """lse_i = log sum_j exp(scale q_i.k_j) over keys in chunks: q [n, D], k [G, D] -> [n].

    Streaming log-sum-exp: m' = max(m, max_j s_ij); l' = l e^(m - m') + sum_j e^(s_ij - m').
    """
    @jax.checkpoint
    def body(carry, block):
        m, l = carry
        s = scale * queries @ block.T                       # [n, c]
        m_new = jnp.maximum(m, s.max(axis=-1))
        l = l * jnp.exp(m - m_new) + jnp.exp(s - m_new[:, None]).sum(axis=-1)
        return (m_new, l), None

    zeros = jnp.zeros_like(queries[:, 0], jnp.float32)   # inherits the queries' device variance
    init = (zeros - jnp.inf, zeros)
    (m, l), _ = jax.lax.scan(body, init, _chunks(keys, chunk_size))
    return m + jnp.log(l)


def _hops(axis_name: AxisName) -> int:
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _ring_perm(hops: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % hops) for i in range(hops)]


def _pass_on(x, axis_name: AxisName, hops: int):
    """Sends a pytree one step around the ring: device i -> i + 1 (mod P)."""
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, _ring_perm(hops)), x)


def _varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """x marked as varying over the batch axes (its gradient is then psum-reduced by autodiff),
    so a custom VJP may return per-device partial cotangents for it."""
    return x if axis_name is None else jax.lax.pcast(x, axis_name, to="varying")


def _check_chunk(chunk_size: int, n: int, hops: int) -> int:
    """The column chunk used inside one [n, D] block: min(chunk_size, n); raises unless it
    divides both the global batch n * hops and the per-device batch n."""
    g = n * hops
    c = min(chunk_size, n)
    if chunk_size <= 0 or g % chunk_size and chunk_size < g or n % c:
        raise ValueError(f"chunk_size={chunk_size} must divide the global batch {g} "
                         f"and, if smaller, the per-device batch {n}")
    return c


# ---- softmax (CLIP) ring ---------------------------------------------------------------------
def _lse_fold(m, l, queries, keys, scale, c):
    """Folds keys [n, D] (chunks of c) into the running log-sum-exp (m, l) [n] of the queries."""
    def body(carry, block):
        m, l = carry
        s = scale * (queries @ block.T)                                      # [n, c]
        m_new = jnp.maximum(m, s.max(axis=-1))
        return (m_new, l * jnp.exp(m - m_new) + jnp.exp(s - m_new[:, None]).sum(axis=-1)), None
    (m, l), _ = jax.lax.scan(body, (m, l), keys.reshape(-1, c, keys.shape[-1]))
    return m, l


def _lse_grads(queries, keys, lse, ct, scale, c):
    """Gradients of sum_i ct_i lse_i restricted to the keys of one block, chunks of c:
    dS = ct_i softmax_ij; (dqueries [n, D], dkeys [n, D], dscale [])."""
    def body(carry, block):
        dq, ds = carry
        ds_ij = ct[:, None] * jnp.exp(scale * (queries @ block.T) - lse[:, None])   # [n, c]
        t = ds_ij @ block                                                    # [n, D]
        # sum_ij dS_ij q_i.k_j = sum_i q_i.(dS k)_i: the scale's gradient without the raw scores
        return (dq + scale * t, ds + jnp.sum(queries * t)), \
            scale * jnp.einsum("ij,id->jd", ds_ij, queries)
    d = keys.shape[-1]
    (dq, ds), dk = jax.lax.scan(body, (jnp.zeros_like(queries), jnp.zeros_like(scale)),
                                keys.reshape(-1, c, d))
    return dq, dk.reshape(-1, d), ds


def _ring_lse_fwd_impl(u, v, scale, axis_name, c):
    hops = _hops(axis_name)
    zeros = jnp.zeros_like(u[:, 0])           # inherits the embeddings' device variance
    init = zeros - jnp.inf, zeros

    def hop(carry, blocks):
        (mu, lu), (mv, lv) = carry
        ub, vb = blocks
        return (_lse_fold(mu, lu, u, vb, scale, c), _lse_fold(mv, lv, v, ub, scale, c))

    state = hop((init, init), (u, v))
    if hops > 1:
        def step(carry, _):
            state, blocks = carry
            blocks = _pass_on(blocks, axis_name, hops)
            return (hop(state, blocks), blocks), None
        (state, _), _ = jax.lax.scan(step, (state, (u, v)), None, length=hops - 1)
    (mu, lu), (mv, lv) = state
    return mu + jnp.log(lu), mv + jnp.log(lv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_lse(u, v, scale, axis_name, c):
    """(lse_i2t, lse_t2i) [n]: log-sum-exp of scale u_i.v_j over all texts j of the global batch,
    and of scale v_i.u_j over all images j; the other towers' blocks come around the ring."""
    return _ring_lse_fwd_impl(u, v, scale, axis_name, c)


def _ring_lse_fwd(u, v, scale, axis_name, c):
    lse = _ring_lse_fwd_impl(u, v, scale, axis_name, c)
    return lse, (u, v, scale, lse)


def _ring_lse_bwd(axis_name, c, res, cts):
    u, v, scale, (lse_u, lse_v) = res
    ct_u, ct_v = cts
    hops = _hops(axis_name)

    def hop(local, blocks):
        du, dv, ds = local
        ub, vb, dub, dvb = blocks
        du_1, dvb_1, ds_1 = _lse_grads(u, vb, lse_u, ct_u, scale, c)       # images vs texts
        dv_2, dub_2, ds_2 = _lse_grads(v, ub, lse_v, ct_v, scale, c)       # texts vs images
        return (du + du_1, dv + dv_2, ds + ds_1 + ds_2), (ub, vb, dub + dub_2, dvb + dvb_1)

    zeros = (jnp.zeros_like(u), jnp.zeros_like(v), jnp.zeros_like(scale))
    local, blocks = hop(zeros, (u, v, jnp.zeros_like(u), jnp.zeros_like(v)))
    if hops > 1:
        def step(carry, _):
            local, blocks = carry
            return hop(local, _pass_on(blocks, axis_name, hops)), None
        (local, blocks), _ = jax.lax.scan(step, (local, blocks), None, length=hops - 1)
        # the block now here belongs to the next device: one more hop takes its gradients home
        blocks = _pass_on(blocks[2:], axis_name, hops)
    else:
        blocks = blocks[2:]
    du, dv, ds = local
    return du + blocks[0], dv + blocks[1], ds


_ring_lse.defvjp(_ring_lse_fwd, _ring_lse_bwd)


def chunked_softmax_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                                     logit_scale: jax.Array, axis_name: AxisName = None,
                                     chunk_size: int = 1024,
                                     max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """CLIP's symmetric InfoNCE with O(n D + n c) peak memory per device (c = chunk_size).

    L = 1/(2G) sum_i [(lse_j s u_i.v_j - s u_i.v_i) + (lse_j s v_i.u_j - s v_i.u_i)],
    the log-sum-exps taken around the ppermute ring (`_ring_lse`, module docstring).
    """
    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    hops = _hops(axis_name)
    c = _check_chunk(chunk_size, u.shape[0], hops)
    scale = inverse_temperature(logit_scale, max_scale)
    lse_i2t, lse_t2i = _ring_lse(u, v, _varying(scale, axis_name), axis_name, c)
    positive = scale * jnp.sum(u * v, axis=-1)                                   # [n]
    total = global_sum(jnp.sum(lse_i2t - positive) + jnp.sum(lse_t2i - positive), axis_name)
    return total / (2 * u.shape[0] * hops), dict(inv_temperature=scale)


# ---- sigmoid (SigLIP) ring -------------------------------------------------------------------
# -log sigmoid(z l) with z = -1 off the diagonal and +1 on it equals softplus(l) - [i = j] l,
# since softplus(l) - softplus(-l) = l. The ring therefore sums softplus over every pair (no
# label matrix) and the positives' -l_ii is taken outside it, on [n] vectors.
def _softplus_block(u, texts, scale, bias):
    """sum_ij softplus(s u_i.t_j + b) over one [n, n] block."""
    return jnp.sum(jax.nn.softplus(scale * (u @ texts.T) + bias))


def _ring_softplus_fwd_impl(u, v, scale, bias, axis_name):
    hops = _hops(axis_name)
    total = _softplus_block(u, v, scale, bias)
    if hops > 1:
        def step(carry, _):
            texts, acc = carry
            texts = _pass_on(texts, axis_name, hops)
            return (texts, acc + _softplus_block(u, texts, scale, bias)), None
        (_, total), _ = jax.lax.scan(step, (v, total), None, length=hops - 1)
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_softplus_sum(u, v, scale, bias, axis_name):
    """sum_ij softplus(s u_i.v_j + b): this device's images against every device's texts []."""
    return _ring_softplus_fwd_impl(u, v, scale, bias, axis_name)


def _ring_softplus_fwd(u, v, scale, bias, axis_name):
    return _ring_softplus_fwd_impl(u, v, scale, bias, axis_name), (u, v, scale, bias)


def _ring_softplus_bwd(axis_name, res, ct):
    u, v, scale, bias = res
    hops = _hops(axis_name)

    def hop(local, blocks):
        du, ds, db = local
        texts, dtexts = blocks
        dl = ct * jax.nn.sigmoid(scale * (u @ texts.T) + bias)       # d softplus(l) = sigmoid(l)
        t = dl @ texts                                                            # [n, D]
        # sum_ij dl_ij u_i.t_j = sum_i u_i.(dl t)_i: the scale's gradient without the raw scores
        return ((du + scale * t, ds + jnp.sum(u * t), db + jnp.sum(dl)),
                (texts, dtexts + scale * jnp.einsum("ij,id->jd", dl, u)))

    local, blocks = hop((jnp.zeros_like(u), jnp.zeros_like(scale), jnp.zeros_like(bias)),
                        (v, jnp.zeros_like(v)))
    if hops > 1:
        def step(carry, _):
            local, blocks = carry
            return hop(local, _pass_on(blocks, axis_name, hops)), None
        (local, blocks), _ = jax.lax.scan(step, (local, blocks), None, length=hops - 1)
        dv = _pass_on(blocks[1], axis_name, hops)   # the visiting texts' gradients go home
    else:
        dv = blocks[1]
    du, ds, db = local
    return du, dv, ds, db


_ring_softplus_sum.defvjp(_ring_softplus_fwd, _ring_softplus_bwd)


def ring_sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                                  logit_scale: jax.Array, logit_bias: jax.Array,
                                  axis_name: AxisName = None,
                                  max_scale: float = MAX_LOGIT_SCALE) -> tuple[jax.Array, dict]:
    """SigLIP loss computed as a ring over the batch axes; equals `sigmoid_contrastive_loss`.

    L = -1/G sum_i sum_j log sigmoid(z_ij (s u_i.v_j + b)), z_ij = +1 on positives only,
      = 1/G [sum_ij softplus(s u_i.v_j + b) - sum_i (s u_i.v_i + b)].
    """
    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    scale = inverse_temperature(logit_scale, max_scale)
    bias = logit_bias.astype(jnp.float32)
    pairs = _ring_softplus_sum(u, v, _varying(scale, axis_name), _varying(bias, axis_name),
                               axis_name)
    positives = jnp.sum(scale * jnp.sum(u * v, axis=-1) + bias)
    global_batch = u.shape[0] * _hops(axis_name)
    return global_sum(pairs - positives, axis_name) / global_batch, dict(inv_temperature=scale,
                                                                         logit_bias=bias)
