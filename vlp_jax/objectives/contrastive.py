"""Objectives of the contrastive family (CLIP / ALIGN / SigLIP / LiT / FLIP and the
self-supervised additions of SLIP and A-CLIP).

Every objective reads the method's shared outputs (`ObjectiveInput.outputs`):
  image_emb, text_emb  [B, D] unit-norm embeddings (the CLIP view),
  pooled               list of the image tower's pooled outputs [B, W], one per image view,
  teacher_pooled       list of the EMA teacher's pooled outputs [B, W] of the full views,
and the parameters (temperature, heads). Heads are applied through `apply_head(params, name,
x)`, a function of the method's model wrapper (`vlp_jax.methods.heads.WithHeads`).

Temperatures are *not* clamped here: CLIP clamps its learnable logit scale to [0, ln 100]
after the optimizer step (open_clip `logit_scale.clamp_`), which this library does in
`Method.project_params`; clamping in the forward pass would zero the gradient past the bound.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from vlp_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from vlp_jax.losses.contrastive_blockwise import (chunked_softmax_contrastive_loss,
                                                  ring_sigmoid_contrastive_loss)
from vlp_jax.losses.simclr import nt_xent_loss
from vlp_jax.objectives.core import Objective
from vlp_jax.parallel.sharding import shard_batch_fn

LOSSES = ("softmax", "sigmoid")
UNCLAMPED = float("inf")   # max_scale of the loss functions: no forward clamp


def _loss_body(kind: str, chunk_size: int = 0, ring: bool = False) -> Callable:
    if kind == "softmax":
        if chunk_size:
            return lambda u, v, t, axis_name: chunked_softmax_contrastive_loss(
                u, v, t, axis_name, chunk_size, max_scale=UNCLAMPED)
        return functools.partial(softmax_contrastive_loss, max_scale=UNCLAMPED)
    fn = ring_sigmoid_contrastive_loss if ring else sigmoid_contrastive_loss
    return functools.partial(fn, max_scale=UNCLAMPED)


class ContrastiveObjective(Objective):
    """Image-text contrastive loss over the whole (sharded) batch.

    kind 'softmax': symmetric InfoNCE (CLIP eq. in `losses.contrastive`, ALIGN); 'sigmoid':
    SigLIP eq. 1 (needs params['logit_bias']). chunk_size > 0: column-chunked softmax;
    ring: SigLIP's ppermute ring. Reads outputs['image_emb'], outputs['text_emb'] [B, D].
    """

    def __init__(self, mesh, kind: str = "softmax", chunk_size: int = 0, ring: bool = False,
                 name: str = "itc"):
        if kind not in LOSSES:
            raise ValueError(f"method.loss {kind!r} is unknown; valid: {LOSSES}")
        self.name, self.kind = name, kind
        self._fn = shard_batch_fn(_loss_body(kind, chunk_size, ring), mesh, 2,
                                  1 if kind == "softmax" else 2)

    def scalars(self, params) -> tuple:
        """The loss's learnable scalars: (logit_scale,) or (logit_scale, logit_bias)."""
        if self.kind == "softmax":
            return (params["logit_scale"],)
        return (params["logit_scale"], params["logit_bias"])

    def loss_of(self, embeddings: tuple, scalars: tuple) -> tuple[jax.Array, dict]:
        """(loss, metrics) of (image_emb, text_emb) with the given scalars (GradCache's form)."""
        return self._fn(*embeddings, *scalars)

    def __call__(self, inp):
        out = inp.outputs
        loss, metrics = self.loss_of((out["image_emb"], out["text_emb"]),
                                     self.scalars(inp.params))
        return loss, metrics, inp.state


class MultiViewContrastiveObjective(ContrastiveObjective):
    """The contrastive loss averaged over several image views against the same captions
    (A-CLIP with two views): reads outputs['image_embs'] (list of [B, D]), 'text_emb'."""

    def __call__(self, inp):
        out, scalars = inp.outputs, self.scalars(inp.params)
        losses, metrics = [], {}
        for u in out["image_embs"]:
            loss, metrics = self.loss_of((u, out["text_emb"]), scalars)
            losses.append(loss)
        return sum(losses) / len(losses), metrics, inp.state


class SimclrObjective(Objective):
    """SimCLR's NT-Xent (Chen et al. 2020) between two image views through a projection head:
    NT-Xent(h(pooled_1), h(pooled_2); tau), gathered over the batch axes like the ITC.
    Reads outputs['pooled'] (two [B, W]); `head` names the head in the params."""

    def __init__(self, mesh, apply_head: Callable, head: str, temperature: float = 0.1,
                 name: str = "ssl"):
        if temperature <= 0:
            raise ValueError(f"SimCLR temperature must be positive, got {temperature}")
        self.name, self.head, self._apply_head = name, head, apply_head
        self._fn = shard_batch_fn(functools.partial(nt_xent_loss, temperature=temperature),
                                  mesh, 2, 0)

    def __call__(self, inp):
        p1, p2 = inp.outputs["pooled"][:2]
        h = lambda x: self._apply_head(inp.params, self.head, x)
        loss, metrics = self._fn(h(p1), h(p2))
        return loss, metrics, inp.state


def byol_loss(online: jax.Array, target: jax.Array) -> jax.Array:
    """BYOL's regression loss (Grill et al. 2020, eq. 2) summed over the two symmetric terms
    as A-CLIP's code does: 2 * mean_i ||n(p_i) - n(z_i)||^2 = 2 * mean_i (2 - 2 cos(p_i, z_i))
    = 4 * mean_i (1 - cos). online, target [B, D]; no gradient through the target. []"""
    target = jax.lax.stop_gradient(target.astype(jnp.float32))
    online = online.astype(jnp.float32)
    n = lambda x: x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    return 2.0 * jnp.mean(jnp.sum((n(online) - n(target)) ** 2, axis=-1))


class OnlineToEmaDistillObjective(Objective):
    """A-CLIP's online-to-EMA distillation: pred(proj(student pooled of the masked view)) vs
    the EMA teacher's proj(teacher pooled of the full view), `byol_loss` (4 (1 - cos)),
    averaged over the views. Reads outputs['pooled'], outputs['teacher_pooled'] and the
    teacher's params from inp.shared['teacher']."""

    def __init__(self, apply_head: Callable, proj: str, pred: str, name: str = "distill"):
        self.name, self.proj, self.pred, self._apply_head = name, proj, pred, apply_head

    def __call__(self, inp):
        teacher = jax.lax.stop_gradient(inp.shared["teacher"])
        terms = []
        for s, t in zip(inp.outputs["pooled"], inp.outputs["teacher_pooled"]):
            online = self._apply_head(inp.params, self.pred,
                                      self._apply_head(inp.params, self.proj, s))
            target = self._apply_head(teacher, self.proj, t)
            terms.append(byol_loss(online, target))
        return sum(terms) / len(terms), {}, inp.state
