"""Contrastive gradient caching (GradCache, Gao et al. 2021): exact big-batch gradients with
the activation memory of one micro-batch.

1. Embed every micro-batch without keeping activations.
2. Compute the loss on the whole batch's embeddings and its gradient with respect to them
   (the negatives are the whole batch, as in one big step).
3. Re-run each micro-batch's forward pass and pull the cached embedding gradient back
   through it (a VJP), summing parameter gradients.
The result equals the full-batch gradient. `plain_accumulation` (each micro-batch its own
contrastive loss, fewer negatives) is the cheaper, *different* objective, kept as an option.

Micro-batch j holds rows {i K + j}: every device contributes n/K rows to each micro-batch,
so a data-sharded batch stays balanced.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def split_microbatches(tree: Any, num: int) -> Any:
    """Leaves [B, ...] -> [num, B / num, ...], micro-batch j = rows j, j + num, ...."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into {num} micro-batches")
        return jnp.moveaxis(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 1, 0)
    return jax.tree.map(split, tree)


def merge_microbatches(tree: Any) -> Any:
    """Inverse of `split_microbatches`: [num, B / num, ...] -> [B, ...]."""
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def grad_cache_value_and_grad(embed_fn: Callable, scalars_fn: Callable, loss_fn: Callable,
                              params: Any, batch: dict, rng: jax.Array, num_chunks: int):
    """((loss, metrics), grads) of loss_fn(embed_fn(params, batch), scalars_fn(params)).

    embed_fn(params, micro_batch, rng) -> embeddings pytree, leaves [b, ...];
    scalars_fn(params) -> the loss's parameter inputs other than embeddings (temperature...);
    loss_fn(embeddings, scalars) -> (loss, metrics), over the whole batch.
    """
    micro = split_microbatches(batch, num_chunks)
    keys = jax.random.split(rng, num_chunks)

    def embed(xs):
        mb, key = xs
        return jax.lax.stop_gradient(embed_fn(params, mb, key))

    embeddings = merge_microbatches(jax.lax.map(embed, (micro, keys)))
    scalars = scalars_fn(params)
    (loss, metrics), (g_emb, g_scalars) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(embeddings, scalars)

    def backprop(acc, xs):
        mb, key, g = xs
        _, vjp = jax.vjp(lambda p: embed_fn(p, mb, key), params)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backprop, zeros, (micro, keys, split_microbatches(g_emb, num_chunks)))
    _, vjp_scalars = jax.vjp(scalars_fn, params)
    grads = jax.tree.map(jnp.add, grads, vjp_scalars(g_scalars)[0])
    return (loss, metrics), grads


def plain_accumulation_value_and_grad(loss_of_batch: Callable, params: Any, batch: dict,
                                      rng: jax.Array, num_chunks: int):
    """Mean over micro-batches of each micro-batch's own loss and gradient (fewer negatives)."""
    micro = split_microbatches(batch, num_chunks)
    keys = jax.random.split(rng, num_chunks)

    def body(acc, xs):
        mb, key = xs
        (loss, metrics), g = jax.value_and_grad(loss_of_batch, has_aux=True)(params, mb, key)
        return jax.tree.map(jnp.add, acc, (loss, metrics, g)), None

    zero_out = jax.eval_shape(lambda: jax.value_and_grad(loss_of_batch, has_aux=True)(
        params, jax.tree.map(lambda x: x[0], micro), keys[0]))
    (l0, m0), g0 = zero_out
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, m0, g0))
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, keys))
    return jax.tree.map(lambda x: x / num_chunks, ((loss, metrics), grads))
