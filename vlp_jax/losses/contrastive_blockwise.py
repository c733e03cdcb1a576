"""Memory-bounded forms of the contrastive losses for large global batches.

The all-gather losses in `contrastive.py` materialise n x G logits per device (n local rows,
G global batch), and their backward pass holds the gathered [G, D] embeddings and cotangents.
These equal them in value and gradient with a peak that does not grow with G at fixed n:

* `chunked_softmax_contrastive_loss`: CLIP's InfoNCE as a ring. The texts' [n, D] blocks
  travel around the batch axes with `ppermute`; at hop k each device scores its images against
  the visiting texts once, S = s u v_b^T, in column chunks of c <= n, and folds S into its
  images' running (max, sum) log-sum-exp over the rows and into the visiting texts' over the
  columns; that column state travels with the texts, and a last hop takes it home. Each score
  is computed once (the all-gather form computes each twice, once per direction). The backward
  pass is a custom VJP that runs the ring again, recomputing S, with the texts' gradient
  accumulators travelling with them (as ring attention does), so only O(n D) embeddings and
  one n x c block exist at a time. Without an axis (one device) the same code is a blockwise
  log-sum-exp over column chunks of the batch.
* `ring_sigmoid_contrastive_loss`: SigLIP's ring (Zhai et al. 2023, sec. 3.3): text
  embeddings travel around the batch axes with `ppermute`; at hop k each device scores its
  images against the texts of device (i - k) mod P. The pairs' terms need no normaliser, so
  the custom VJP's forward ring computes the gradients in the same pass (the loss is linear in
  its cotangent) and the texts' gradients travel home with them: one n x n block per hop, no
  recomputation. Peak O(n^2 + n D).

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
    """Sends an array, or a tuple of same-shaped arrays stacked into one message, one step
    around the ring: device i -> i + 1 (mod P)."""
    if not isinstance(x, tuple):
        return jax.lax.ppermute(x, axis_name, _ring_perm(hops))
    return tuple(jax.lax.ppermute(jnp.stack(x), axis_name, _ring_perm(hops)))


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
# Only the texts travel. At each hop a device scores its images against the visiting texts once,
# S = s u v_b^T [n, n], and folds S into two running log-sum-exps: its images' over the rows
# (i2t) and the visiting texts' over the columns (t2i), whose (max, sum) state travels with the
# texts and a last hop takes home. Every image-text score is computed once in the forward pass
# (the all-gather form computes each twice, once per direction) and once more in the backward.
def _fold(row, col, u, texts, scale):
    """Folds one [n, c] score block into the rows' (m, l) [n] and the columns' (m, l) [c]."""
    (rm, rl), (cm, cl) = row, col
    s = scale * (u @ texts.T)
    rm_new, cm_new = jnp.maximum(rm, s.max(axis=1)), jnp.maximum(cm, s.max(axis=0))
    rl = rl * jnp.exp(rm - rm_new) + jnp.exp(s - rm_new[:, None]).sum(axis=1)
    cl = cl * jnp.exp(cm - cm_new) + jnp.exp(s - cm_new[None, :]).sum(axis=0)
    return (rm_new, rl), (cm_new, cl)


def _pack(*xs):
    """[n, k_1], ..., [n] -> one [n, sum k] message (a single ppermute per hop)."""
    return jnp.concatenate([x if x.ndim == 2 else x[:, None] for x in xs], axis=1)


def _ring_lse_fwd_impl(u, v, scale, axis_name, c):
    hops, (n, d) = _hops(axis_name), u.shape

    def hop(row, block):
        texts, cm, cl = block[:, :d], block[:, d], block[:, d + 1]

        def chunk(row, xs):
            t, m, l = xs
            row, (m, l) = _fold(row, (m, l), u, t, scale)
            return row, (m, l)
        row, (cm, cl) = jax.lax.scan(chunk, row, (texts.reshape(-1, c, d), cm.reshape(-1, c),
                                                  cl.reshape(-1, c)))
        return row, _pack(texts, cm.reshape(n), cl.reshape(n))

    zeros = jnp.zeros_like(u[:, 0])           # inherits the embeddings' device variance
    row, block = hop((zeros - jnp.inf, zeros), _pack(v, zeros - jnp.inf, zeros))
    if hops > 1:
        def step(carry, _):
            row, block = carry
            return hop(row, _pass_on(block, axis_name, hops)), None
        (row, block), _ = jax.lax.scan(step, (row, block), None, length=hops - 1)
        block = _pass_on(block[:, d:], axis_name, hops)   # the texts' (m, l) go home
    else:
        block = block[:, d:]
    (rm, rl), (cm, cl) = row, (block[:, 0], block[:, 1])
    return rm + jnp.log(rl), cm + jnp.log(cl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_lse(u, v, scale, axis_name, c):
    """(lse_i2t, lse_t2i) [n]: log-sum-exp of scale u_i.v_j over all texts j of the global batch,
    and of scale v_i.u_j over all images j; the texts come around the ring."""
    return _ring_lse_fwd_impl(u, v, scale, axis_name, c)


def _ring_lse_fwd(u, v, scale, axis_name, c):
    lse = _ring_lse_fwd_impl(u, v, scale, axis_name, c)
    return lse, (u, v, scale, lse)


def _ring_lse_bwd(axis_name, c, res, cts):
    """dS_ij = ct_u_i softmax_row(S)_ij + ct_v_j softmax_col(S)_ij on each block S = s u v_b^T;
    the visiting texts carry (lse, ct, gradient accumulator) and a last hop takes the
    gradients home."""
    u, v, scale, (lse_u, lse_v) = res
    ct_u, ct_v = cts
    hops, (n, d) = _hops(axis_name), u.shape

    def hop(local, block):
        texts, dtexts, lse_t, ct_t = block[:, :d], block[:, d:2 * d], block[:, 2 * d], \
            block[:, 2 * d + 1]

        def chunk(local, xs):
            du, ds = local
            t, dt, lt, ctt = xs
            s = scale * (u @ t.T)                                              # [n, c]
            d_s = (ct_u[:, None] * jnp.exp(s - lse_u[:, None])
                   + ctt[None, :] * jnp.exp(s - lt[None, :]))
            g = d_s @ t                                                          # [n, D]
            # sum_ij dS_ij u_i.t_j = sum_i u_i.(dS t)_i: the scale's gradient without the scores
            return (du + scale * g, ds + jnp.sum(u * g)), \
                dt + scale * jnp.einsum("ij,id->jd", d_s, u)
        local, dtexts = jax.lax.scan(chunk, local, (
            texts.reshape(-1, c, d), dtexts.reshape(-1, c, d), lse_t.reshape(-1, c),
            ct_t.reshape(-1, c)))
        return local, _pack(texts, dtexts.reshape(n, d), lse_t, ct_t)

    local, block = hop((jnp.zeros_like(u), jnp.zeros_like(scale)),
                       _pack(v, jnp.zeros_like(v), lse_v, ct_v))
    if hops > 1:
        def step(carry, _):
            local, block = carry
            return hop(local, _pass_on(block, axis_name, hops)), None
        (local, block), _ = jax.lax.scan(step, (local, block), None, length=hops - 1)
        dv = _pass_on(block[:, d:2 * d], axis_name, hops)   # the texts' gradients go home
    else:
        dv = block[:, d:2 * d]
    du, ds = local
    return du, dv, ds


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
    """The sum and, in the same ring, its gradients (the sum is linear in its cotangent, and
    each pair's term needs no global normaliser): one score block per hop, no recomputation.
    The visiting texts carry their gradient accumulator; a last hop takes it home."""
    hops, d = _hops(axis_name), u.shape[1]

    def hop(local, block):
        total, du, ds, db = local
        texts, dtexts = block[:, :d], block[:, d:]
        logits = scale * (u @ texts.T) + bias                                     # [n, n]
        dl = jax.nn.sigmoid(logits)                                # d softplus(l) = sigmoid(l)
        g = dl @ texts                                                            # [n, D]
        # sum_ij dl_ij u_i.t_j = sum_i u_i.(dl t)_i: the scale's gradient without the raw scores
        local = (total + jnp.sum(jax.nn.softplus(logits)), du + scale * g, ds + jnp.sum(u * g),
                 db + jnp.sum(dl))
        return local, _pack(texts, dtexts + scale * jnp.einsum("ij,id->jd", dl, u))

    zero = jnp.zeros_like(scale)
    local, block = hop((zero, jnp.zeros_like(u), zero, zero), _pack(v, jnp.zeros_like(v)))
    if hops > 1:
        def step(carry, _):
            local, block = carry
            return hop(local, _pass_on(block, axis_name, hops)), None
        (local, block), _ = jax.lax.scan(step, (local, block), None, length=hops - 1)
        dv = _pass_on(block[:, d:], axis_name, hops)   # the visiting texts' gradients go home
    else:
        dv = block[:, d:]
    total, du, ds, db = local
    return total, (du, dv, ds, db)


def _ring_softplus_bwd(axis_name, res, ct):
    du, dv, ds, db = res
    return ct * du, ct * dv, ct * ds, ct * db


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
