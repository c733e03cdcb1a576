"""Image-text matching (ITM): negative sampling and the binary matching loss.

ITM asks a fusion encoder whether an (image, text) pair belongs together. Its negatives are

* hard negatives (ALBEF, Li et al. 2021, sec. 3.2; BLIP; VLMo): for every image one text is
  drawn from the batch with probability proportional to exp(s_ij), i.e.
  softmax_j(s_i)[j] renormalised over j != positive, and likewise one image for every text;
* random negatives (ViLT, Kim et al. 2021): any other sample of the batch, uniformly.

`hard_negative_indices` follows the `axis_name` pattern of `vlp_jax.losses.contrastive`: with
a mesh axis it runs inside `jax.shard_map`, the similarities of this device's n rows are taken
against the gathered global batch of G = n * devices columns, and row i's positive is global
column `axis_index * n + i`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlp_jax.nn.collectives import AxisName, row_offset


def _device_key(rng: jax.Array, axis_name: AxisName) -> jax.Array:
    """`rng` with this device's index folded in, so devices draw different samples."""
    if axis_name is None:
        return rng
    return jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def _sample_excluding_positive(rng: jax.Array, sim: jax.Array, positive: jax.Array) -> jax.Array:
    """One column per row drawn from softmax(sim[i]) with column positive[i] excluded.

    sim [n, G] float, positive [n] int -> int32 [n]. Excluding a column and renormalising
    is the same as a categorical over the logits with that column at -inf (exact: the
    positive is never drawn, whatever the similarities).
    """
    sim = sim.astype(jnp.float32)
    is_pos = jax.nn.one_hot(positive, sim.shape[1], dtype=bool)
    logits = jnp.where(is_pos, -jnp.inf, sim)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def hard_negative_indices(rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array,
                          axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
    """ALBEF's hard-negative sampling for ITM.

    For image i (row of `sim_i2t`) one negative text j != p(i) is drawn with

        P(j | i) = exp(s_ij) / sum_{k != p(i)} exp(s_ik),      p(i) = row_offset + i

    (ALBEF: weights = softmax(sim), positive zeroed, multinomial), and likewise one negative
    image for each text from `sim_t2i`. Pass similarities already divided by the temperature
    and without gradient (the sampling is not differentiated anyway).

    Args:
      rng: a PRNG key, the same on every device (the device index is folded in here).
      sim_i2t: [n, G] similarities of this device's n images to all G texts.
      sim_t2i: [n, G] similarities of this device's n texts to all G images.
      axis_name: None (one device / global view, row_offset = 0) or the mesh axis the batch
        is split over (inside `jax.shard_map`).
    Returns:
      (neg_text_idx int32 [n], neg_image_idx int32 [n]): global indices into the gathered
      batch. G must be at least 2.
    """
    n = sim_i2t.shape[0]
    if sim_i2t.shape != sim_t2i.shape:
        raise ValueError(f"sim_i2t {sim_i2t.shape} and sim_t2i {sim_t2i.shape} must match")
    if sim_i2t.shape[1] < 2:
        raise ValueError("hard negatives need a global batch of at least 2 samples")
    positive = row_offset(n, axis_name) + jnp.arange(n)
    k_text, k_image = jax.random.split(_device_key(rng, axis_name))
    return (_sample_excluding_positive(k_text, sim_i2t, positive),
            _sample_excluding_positive(k_image, sim_t2i, positive))


def random_negative_indices(rng: jax.Array, n: int, global_batch: int,
                            row_offset: jax.Array | int) -> jax.Array:
    """ViLT's random negatives: for each of n rows a uniform index in [0, G) other than its own.

    Row i's own index is row_offset + i; the draw is own + U{1, .., G-1} (mod G), uniform
    over the G - 1 other samples. Returns int32 [n]. Inside `shard_map`, fold the device
    index into `rng` first if devices should draw differently.
    """
    if global_batch < 2:
        raise ValueError(f"random ITM negatives need global_batch >= 2, got {global_batch}")
    own = jnp.asarray(row_offset, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    shift = jax.random.randint(rng, (n,), 1, global_batch, dtype=jnp.int32)
    return (own + shift) % global_batch


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean binary cross-entropy of the ITM head (two-way softmax).

    L = -1/N sum_i log softmax(z_i)[y_i],  y_i = 1 for a matched pair, 0 otherwise.
    logits [N, 2], labels int [N]. Returns (loss [], dict(itm_acc=accuracy)).
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, dict(itm_acc=acc)
