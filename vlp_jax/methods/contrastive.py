"""Dual-encoder contrastive pretraining: CLIP / ALIGN (softmax) and SigLIP (sigmoid),
with FLIP's random patch masking as an option.

config.method fields:
  loss: 'softmax' (CLIP, ALIGN) or 'sigmoid' (SigLIP; the model needs `logit_bias_init`).
  mask_ratio: fraction of image patches dropped before the image encoder (FLIP; 0 = none).
  accumulation: 'none', 'grad_cache' (exact big-batch gradient in `micro_batches` pieces) or
    'plain' (each micro-batch its own loss: fewer negatives, less memory).
  micro_batches: number of pieces for the two accumulation modes.
  chunk_size: > 0 selects the memory-bounded chunked softmax loss (column chunks of this
    size); for 'sigmoid', `ring=True` selects the ppermute ring instead of the all-gather.
  unmasked_tuning_steps: FLIP's last phase: the final N of `total_steps` steps run without
    masking (0 = off); `total_steps` is linked to train.num_steps by the experiment file.

LiT's locked tower and a fixed temperature are the trainer's top-level `config.init` (copy
parameter subtrees from a checkpoint) and `config.frozen` (regexes over parameter paths),
which work for every method.
"""
from __future__ import annotations

import dataclasses
import functools

import jax

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.losses.contrastive_blockwise import (chunked_softmax_contrastive_loss,
                                                  ring_sigmoid_contrastive_loss)
from vlp_jax.methods.base import Method
from vlp_jax.methods.grad_cache import (grad_cache_value_and_grad,
                                        plain_accumulation_value_and_grad)
from vlp_jax.models.vit import random_keep_ids
from vlp_jax.parallel.sharding import shard_batch_fn

LOSSES = ("softmax", "sigmoid")
ACCUMULATION = ("none", "grad_cache", "plain")


@dataclasses.dataclass
class ContrastiveMethod(Method):

    def __post_init__(self):
        kind = self.config.get("loss", "softmax")
        if kind not in LOSSES:
            raise ValueError(f"method.loss {kind!r} is unknown; valid: {LOSSES}")
        if kind == "sigmoid" and self.model.logit_bias_init is None:
            raise ValueError("method.loss='sigmoid' needs model.logit_bias_init (SigLIP: -10.0)")
        ratio = self.config.get("mask_ratio", 0.0)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in [0, 1), got {ratio}")
        accumulation = self.config.get("accumulation", "none")
        if accumulation not in ACCUMULATION:
            raise ValueError(f"method.accumulation {accumulation!r} is unknown; valid: {ACCUMULATION}")
        self._kind = kind
        self._itc = shard_batch_fn(self._loss_body(), self.mesh, 2, 1 if kind == "softmax" else 2)
        tower = getattr(self.model, "image_tower", None)
        if ratio > 0 and tower is not None and not hasattr(tower, "patch_size"):
            raise ValueError("method.mask_ratio > 0 (FLIP) needs a patch-based image tower "
                             f"(model.image.type='vit'), not {type(tower).__name__}")
        tuning = self.config.get("unmasked_tuning_steps", 0)
        if tuning and self.config.get("total_steps", 0) <= 0:
            raise ValueError("method.unmasked_tuning_steps needs method.total_steps (link it: "
                             "config.method.total_steps = config.train.get_ref('num_steps'))")

    def _loss_body(self):
        chunk = self.config.get("chunk_size", 0)
        if self._kind == "softmax":
            if chunk:
                return lambda u, v, t, axis_name: chunked_softmax_contrastive_loss(
                    u, v, t, axis_name, chunk)
            return softmax_contrastive_loss
        return ring_sigmoid_contrastive_loss if self.config.get("ring", False) \
            else sigmoid_contrastive_loss

    def keep_ids(self, rng, images, masked=True):
        """FLIP masking: indices of the kept patches [B, K], or None without masking."""
        ratio = self.config.get("mask_ratio", 0.0) if masked else 0.0
        if ratio == 0.0:
            return None
        tower = self.model.image_tower
        num_patches = (tower.image_size // tower.patch_size) ** 2
        keep = max(1, int(round(num_patches * (1.0 - ratio))))
        return random_keep_ids(rng, images.shape[0], num_patches, keep)

    def embed(self, params, batch, rng, masked=True):
        """(image_emb [B, D], text_emb [B, D]) of a batch (FLIP masking drawn from rng)."""
        variables = {"params": params}
        u = self.model.apply(variables, batch["image"], self.keep_ids(rng, batch["image"], masked),
                             method="encode_image")
        v = self.model.apply(variables, batch["text"], method="encode_text")
        return u, v

    def scalars(self, params):
        """The loss's learnable scalars: (logit_scale,) or (logit_scale, logit_bias)."""
        if self._kind == "softmax":
            return (params["logit_scale"],)
        return (params["logit_scale"], params["logit_bias"])

    def itc(self, embeddings, scalars):
        """(loss, metrics) of the contrastive loss over the whole (sharded) batch."""
        return self._itc(*embeddings, *scalars)

    def loss(self, params, aux, batch, rng, step, masked=True):
        loss, metrics = self.itc(self.embed(params, batch, rng, masked), self.scalars(params))
        return loss, metrics, aux

    def value_and_grad(self, params, aux, batch, rng, step):
        """FLIP unmasked tuning: `lax.cond` on the step picks the masked or the unmasked
        computation; both are compiled (their shapes differ), only one runs per step."""
        tuning = self.config.get("unmasked_tuning_steps", 0)
        if not tuning or self.config.get("mask_ratio", 0.0) == 0.0:
            return self._value_and_grad(params, aux, batch, rng, step, True)
        start = self.config.total_steps - tuning
        return jax.lax.cond(
            step >= start,
            lambda: self._value_and_grad(params, aux, batch, rng, step, False),
            lambda: self._value_and_grad(params, aux, batch, rng, step, True))

    def _value_and_grad(self, params, aux, batch, rng, step, masked):
        mode = self.config.get("accumulation", "none")
        pieces = self.config.get("micro_batches", 1)
        embed = self.embed if masked else functools.partial(self.embed, masked=False)
        if mode == "none" or pieces == 1:
            if masked:
                return super().value_and_grad(params, aux, batch, rng, step)

            def loss_fn(p):
                loss, metrics, new_aux = self.loss(p, aux, batch, rng, step, masked=False)
                return loss, (metrics, new_aux)
            return jax.value_and_grad(loss_fn, has_aux=True)(params)
        if mode == "grad_cache":
            (loss, metrics), grads = grad_cache_value_and_grad(
                embed, self.scalars, self.itc, params, batch, rng, pieces)
        else:
            def loss_of_batch(p, mb, key):
                return self.itc(embed(p, mb, key), self.scalars(p))
            (loss, metrics), grads = plain_accumulation_value_and_grad(
                loss_of_batch, params, batch, rng, pieces)
        return (loss, (metrics, aux)), grads
