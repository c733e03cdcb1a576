"""Dual-encoder contrastive pretraining: CLIP / ALIGN (softmax) and SigLIP (sigmoid),
with FLIP's random patch masking as an option.

config.method fields:
  loss: 'softmax' (CLIP, ALIGN) or 'sigmoid' (SigLIP; the model needs `logit_bias_init`).
  mask_ratio: fraction of image patches dropped before the image encoder (FLIP; 0 = none).
"""
from __future__ import annotations

import dataclasses

import jax

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.methods.base import Method
from vlp_jax.models.vit import random_keep_ids
from vlp_jax.parallel.sharding import shard_batch_fn

LOSSES = ("softmax", "sigmoid")


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
        self._kind = kind
        self._itc = (shard_batch_fn(softmax_contrastive_loss, self.mesh, 2, 1) if kind == "softmax"
                     else shard_batch_fn(sigmoid_contrastive_loss, self.mesh, 2, 2))

    def keep_ids(self, rng, images):
        """FLIP masking: indices of the kept patches [B, K], or None without masking."""
        ratio = self.config.get("mask_ratio", 0.0)
        if ratio == 0.0:
            return None
        tower = self.model.image_tower
        num_patches = (tower.image_size // tower.patch_size) ** 2
        keep = max(1, int(round(num_patches * (1.0 - ratio))))
        return random_keep_ids(rng, images.shape[0], num_patches, keep)

    def loss(self, params, aux, batch, rng, step):
        out = self.model.apply({"params": params}, batch["image"], batch["text"],
                               keep_ids=self.keep_ids(rng, batch["image"]))
        if self._kind == "softmax":
            loss, metrics = self._itc(out["image_emb"], out["text_emb"], out["logit_scale"])
        else:
            loss, metrics = self._itc(out["image_emb"], out["text_emb"], out["logit_scale"],
                                      out["logit_bias"])
        return loss, metrics, aux
