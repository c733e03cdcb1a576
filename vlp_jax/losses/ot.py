"""Word-patch / word-region alignment by optimal transport (UNITER's WRA, ViLT's WPA).

Text tokens x_1..x_N and image tokens y_1..y_M of a pair carry uniform masses 1/N and 1/M;
the cost of moving mass from x_i to y_j is the cosine distance C_ij = 1 - cos(x_i, y_j), and
the pair's distance is the optimal transport cost

    D(x, y) = min_{T in Pi(1/N, 1/M)} <C, T> = trace(C^T T*).

T* is approximated with IPOT (Xie et al. 2019, "A Fast Proximal Point Method for Computing
Exact Wasserstein Distance", Alg. 1), a proximal-point iteration whose fixed point is the
exact optimum (unlike Sinkhorn's entropic one):

    A = exp(-C / beta),  T^(0) = 1 1^T,  sigma = 1/M
    repeat: Q = A (.) T
            k times: delta = mu / (Q sigma),  sigma = nu / (Q^T delta)
            T = diag(delta) Q diag(sigma)

The plan is a constant (computed under stop_gradient, in float32); gradients reach the
features through C only. UNITER/ViLT: beta 0.5, 50 iterations, k 1; the loss
(sum_pos D - sum_neg D) / B is weighted by 0.1 by the caller.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_TINY = 1e-30   # floor of IPOT's denominators (a fully underflowed row would divide by 0)


def cosine_cost(x: jax.Array, y: jax.Array, eps: float = 1e-6) -> jax.Array:
    """C_ij = 1 - <x_i, y_j> / (|x_i| |y_j|). x [B, N, D], y [B, M, D] -> [B, N, M] float32."""
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    y = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), eps)
    return 1.0 - jnp.einsum("bnd,bmd->bnm", x, y)


def ipot(cost: jax.Array, x_mask: jax.Array, y_mask: jax.Array, beta: float = 0.5,
         iterations: int = 50, k: int = 1) -> jax.Array:
    """Inexact proximal point optimal transport plan with uniform marginals (IPOT, Alg. 1).

    Args:
      cost: [B, N, M] transport costs (any dtype; the iteration runs in float32).
      x_mask: bool [B, N] valid source tokens; y_mask: bool [B, M] valid target tokens.
        Masses are uniform over the valid entries: mu_i = 1/N_valid, nu_j = 1/M_valid;
        masked rows and columns carry zero mass.
      beta: proximal step (the plan is pulled towards the previous one by exp(-C / beta)).
      iterations: outer proximal steps; k: inner Sinkhorn-like scaling steps per outer step.
    Returns:
      plan T [B, N, M] float32, without gradient. Column sums equal nu exactly after the last
      step; row sums approach mu as the iteration converges.
    """
    if beta <= 0 or iterations < 1 or k < 1:
        raise ValueError(f"ipot needs beta > 0, iterations >= 1 and k >= 1; got beta={beta}, "
                         f"iterations={iterations}, k={k}")
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    x_mask = x_mask.astype(bool)
    y_mask = y_mask.astype(bool)
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    nx = jnp.maximum(x_mask.sum(-1, keepdims=True), 1).astype(jnp.float32)   # [B, 1]
    ny = jnp.maximum(y_mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
    kernel = jnp.where(valid, jnp.exp(-cost / beta), 0.0)
    sigma0 = jnp.where(y_mask, 1.0 / ny, 0.0)                                 # [B, M]
    delta0 = jnp.where(x_mask, 1.0 / nx, 0.0)                                 # [B, N]

    def outer(_, state):
        plan, sigma, delta = state
        q = kernel * plan
        for _ in range(k):
            delta = jnp.where(x_mask, 1.0 / (nx * jnp.maximum(
                jnp.einsum("bnm,bm->bn", q, sigma), _TINY)), 0.0)
            sigma = jnp.where(y_mask, 1.0 / (ny * jnp.maximum(
                jnp.einsum("bnm,bn->bm", q, delta), _TINY)), 0.0)
        return delta[:, :, None] * q * sigma[:, None, :], sigma, delta

    plan, _, _ = jax.lax.fori_loop(0, iterations, outer,
                                   (valid.astype(jnp.float32), sigma0, delta0))
    return jax.lax.stop_gradient(plan)


def ot_distance(cost: jax.Array, plan: jax.Array) -> jax.Array:
    """D_b = trace(C_b^T T_b) = sum_ij C_bij T_bij. cost, plan [B, N, M] -> [B] float32."""
    return jnp.sum(cost.astype(jnp.float32) * plan.astype(jnp.float32), axis=(1, 2))


def wpa_loss(text_feats: jax.Array, text_mask: jax.Array, image_feats: jax.Array,
             image_mask: jax.Array, is_positive: jax.Array, *, beta: float = 0.5,
             iterations: int = 50, k: int = 1) -> tuple[jax.Array, dict]:
    """Word-patch alignment loss (UNITER's WRA form, used by ViLT).

    L = ( sum_{b positive} D_b - sum_{b negative} D_b ) / B,
    D_b = <C_b, T_b>, C_b = 1 - cos(text_b, image_b), T_b = IPOT plan (a constant).

    The caller applies the loss weight (0.1 in UNITER/ViLT) and excludes the special tokens
    through the masks: ViLT sets text_mask False at CLS/BOS, at the last valid token (EOS/SEP)
    and at padding, and image_mask False at the image CLS token (and at padded patches).

    Args:
      text_feats [B, L, D], text_mask bool [B, L], image_feats [B, N, D],
      image_mask bool [B, N], is_positive bool [B] (True = matched pair).
    Returns:
      (loss [], dict(ot_pos = mean D over positive pairs, ot_neg = mean D over negatives)).
    """
    cost = cosine_cost(text_feats, image_feats)                                # [B, L, N]
    plan = ipot(cost, text_mask, image_mask, beta=beta, iterations=iterations, k=k)
    dist = ot_distance(cost, plan)                                              # [B]
    pos = is_positive.astype(bool)
    sum_pos = jnp.sum(jnp.where(pos, dist, 0.0))
    sum_neg = jnp.sum(jnp.where(pos, 0.0, dist))
    n_pos = jnp.sum(pos).astype(jnp.float32)
    n_neg = pos.shape[0] - n_pos
    loss = (sum_pos - sum_neg) / pos.shape[0]
    metrics = dict(ot_pos=sum_pos / jnp.maximum(n_pos, 1.0),
                   ot_neg=sum_neg / jnp.maximum(n_neg, 1.0))
    return loss, jax.lax.stop_gradient(metrics)
