"""The captioning objective: teacher-forcing cross-entropy over the model's `lm_*` outputs
(`vlp_jax.models.generation`), and SimVLM's PrefixLM draw of prefix lengths.

PrefixLM (SimVLM, Wang et al. 2022): each caption `bos w_1 .. w_n eos` is split at p drawn
per example; the model encodes the image with `w_<=p` and predicts the rest. Here
p ~ Uniform{0, .., floor(prefix_fraction * n)} (`prefix_fraction` 0: always p = 0, plain
captioning). Deviation: SimVLM draws p over the whole text; capping it at a fraction keeps
the captioning case (p = 0, how captions are generated) frequent at toy scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.losses.captioning import caption_loss
from vlp_jax.objectives.core import Objective


def draw_prefix_lengths(rng: jax.Array, tokens: jax.Array, fraction: float,
                        special_ids) -> jax.Array:
    """p ~ Uniform{0 .. floor(fraction * n)} per row, n = the row's ordinary tokens.
    tokens int [B, L] -> int32 [B]."""
    ordinary = jnp.ones(tokens.shape, bool)
    for sid in special_ids:
        ordinary &= tokens != sid
    n = jnp.sum(ordinary, axis=-1)
    hi = jnp.floor(fraction * n.astype(jnp.float32)).astype(jnp.int32)
    u = jax.random.uniform(rng, n.shape)
    return jnp.minimum(jnp.floor(u * (hi + 1).astype(jnp.float32)).astype(jnp.int32), hi)


class CaptionObjective(Objective):
    """Reads outputs lm_logits [B, L, V], lm_targets [B, L], lm_weights [B, L]; metrics
    token_acc, nll. With prefix_fraction > 0 its `prepare_batch` adds batch['prefix_len']
    int32 [B] (the method passes it to the model)."""

    def __init__(self, vocab: dict, label_smoothing: float = 0.0, prefix_fraction: float = 0.0,
                 name: str = "caption"):
        if not 0.0 <= prefix_fraction <= 1.0:
            raise ValueError(f"method.prefix_fraction must be in [0, 1], got {prefix_fraction}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"method.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.name, self.label_smoothing = name, float(label_smoothing)
        self.prefix_fraction = float(prefix_fraction)
        self.special_ids = tuple(vocab[k] for k in ("pad_id", "bos_id", "eos_id") if k in vocab)

    def prepare_batch(self, batch, rng):
        if not self.prefix_fraction:
            return batch
        return dict(batch, prefix_len=draw_prefix_lengths(rng, batch["text"],
                                                          self.prefix_fraction,
                                                          self.special_ids))

    def __call__(self, inp):
        o = inp.outputs
        loss, metrics = caption_loss(o["lm_logits"], o["lm_targets"], o["lm_weights"],
                                     self.label_smoothing)
        return loss, metrics, inp.state
