"""Dual-encoder contrastive pretraining: CLIP / ALIGN (softmax) and SigLIP (sigmoid),
with FLIP's random patch masking as an option, on the objectives seam.

The method computes the shared outputs once (`forward`: image_emb, text_emb [B, D]) and hands
them to its `Combiner` (`vlp_jax.objectives`); the contrastive term is the objective `itc`
(`objectives.contrastive.ContrastiveObjective`). The self-supervised variants (SLIP, A-CLIP,
MaskCLIP) subclass this and add outputs, objectives, Flax heads (`heads()`, initialised by
Flax through `methods.heads.WithHeads`) and an EMA teacher (`teacher()`).

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
  objectives: optional {objective name: {weight, start_step, ramp_steps}} over the method's
    objectives (`itc`, and the variants' own), e.g. objectives.ssl.ramp_steps=100.

Temperature: the learnable logit scale t (s = exp t) is clamped to [0, ln 100] *after* each
optimizer step (`project_params`), as open_clip does (`logit_scale.clamp_(0, ln 100)`); the
forward pass uses exp(t) unclamped, so t keeps its gradient at the bound.

LiT's locked tower and a fixed temperature are the trainer's top-level `config.init` (copy
parameter subtrees from a checkpoint) and `config.frozen` (regexes over parameter paths),
which work for every method.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from vlp_jax.methods.base import Method
from vlp_jax.methods.grad_cache import (grad_cache_value_and_grad,
                                        plain_accumulation_value_and_grad)
from vlp_jax.methods.heads import WithHeads, head_fn
from vlp_jax.models.vit import random_keep_ids
from vlp_jax.objectives.contrastive import LOSSES, ContrastiveObjective
from vlp_jax.objectives.core import Combiner, Term, override_terms
from vlp_jax.objectives.teacher import EmaTeacher
from vlp_jax.methods.registry import register_method

ACCUMULATION = ("none", "grad_cache", "plain")
LOGIT_SCALE_RANGE = (0.0, math.log(100.0))     # open_clip's clamp of t = log(1 / tau)


def clamp_logit_scale(params: dict) -> dict:
    """Clamps the logit scale t into [0, ln 100] (open_clip's `logit_scale.clamp_`), the
    projection applied after the optimizer update; params without one pass unchanged."""
    if "logit_scale" not in params:
        return params
    lo, hi = LOGIT_SCALE_RANGE
    t = params["logit_scale"]
    return dict(params, logit_scale=jnp.clip(t, lo, hi).astype(t.dtype))


def named_metrics(name: str, loss, metrics: dict) -> dict:
    """The combiner's metric names for one objective: `<name>/<metric>`, `loss/<name>`."""
    return dict({f"{name}/{k}": v for k, v in metrics.items()}, **{f"loss/{name}": loss})


@register_method("contrastive")
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
        tower = getattr(self.model, "image_tower", None)
        if ratio > 0 and tower is not None and not hasattr(tower, "patch_size"):
            raise ValueError("method.mask_ratio > 0 (FLIP) needs a patch-based image tower "
                             f"(model.image.type='vit'), not {type(tower).__name__}")
        tuning = self.config.get("unmasked_tuning_steps", 0)
        if tuning and self.config.get("total_steps", 0) <= 0:
            raise ValueError("method.unmasked_tuning_steps needs method.total_steps (link it: "
                             "config.method.total_steps = config.train.get_ref('num_steps'))")
        self._itc = ContrastiveObjective(self.mesh, kind, self.config.get("chunk_size", 0),
                                         self.config.get("ring", False))
        self.setup()
        heads = tuple(self.heads())
        self.net = WithHeads(self.model, heads) if heads else self.model
        self.apply_head = head_fn(self.net) if heads else None
        self.ema = self.teacher()
        self.combiner = Combiner(override_terms(self.terms(), self.config.get("objectives", None)))
        if accumulation != "none" and self.combiner.names != ("itc",):
            raise ValueError(f"method.accumulation={accumulation!r} splits only the contrastive "
                             f"term over micro-batches; this method's objectives are "
                             f"{list(self.combiner.names)}; valid: ['none']")

    # ---- what a variant adds ----------------------------------------------------------------
    def setup(self):
        """Variant-specific checks and settings, run before heads/teacher/terms are built."""

    def heads(self) -> tuple:
        """(name, Flax module, example(base, images, tokens) -> args) of the extra heads."""
        return ()

    def teacher(self) -> EmaTeacher | None:
        """The EMA teacher (aux['teacher']) or None."""
        return None

    def terms(self) -> list[Term]:
        """The default objectives; `method.objectives` may re-weight and schedule them."""
        return [Term(self._itc)]

    # ---- state ------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        return self.net.init(rng, batch["image"], batch["text"])["params"]

    def init_aux(self, params):
        return {} if self.ema is None else {"teacher": self.ema.init(params)}

    def aux_shardings(self, abstract_aux, param_shardings):
        if self.ema is None:
            return super().aux_shardings(abstract_aux, param_shardings)
        return {"teacher": self.ema.shardings(param_shardings)}

    def after_update(self, params, aux, step):
        if self.ema is None:
            return aux
        return dict(aux, teacher=self.ema.update(aux["teacher"], params))

    def project_params(self, params):
        return clamp_logit_scale(params)

    # ---- forward ----------------------------------------------------------------------------
    def keep_ids(self, rng, images):
        """FLIP masking: indices of the kept patches int32 [B, K] drawn from rng (uniformly
        without replacement, raster order), or None with mask_ratio 0."""
        ratio = self.config.get("mask_ratio", 0.0)
        if ratio == 0.0:
            return None
        tower = self.model.image_tower
        num_patches = (tower.image_size // tower.patch_size) ** 2
        keep = max(1, int(round(num_patches * (1.0 - ratio))))
        return random_keep_ids(rng, images.shape[0], num_patches, keep)

    def batch_keep_ids(self, batch, masked=True):
        """The prepared batch's FLIP mask (batch['keep_ids'] [B, K]) or None (no masking, or
        FLIP's unmasked phase)."""
        if not masked or self.config.get("mask_ratio", 0.0) == 0.0:
            return None
        if "keep_ids" not in batch:
            raise ValueError("FLIP masking (method.mask_ratio > 0) is drawn by "
                             "method.prepare_batch(batch, rng); the batch has no 'keep_ids'")
        return batch["keep_ids"]

    def embed(self, params, batch, rng=None, masked=True):
        """(image_emb [B, D], text_emb [B, D]) of a prepared batch (FLIP: its keep_ids)."""
        variables = {"params": params}
        u = self.model.apply(variables, batch["image"], self.batch_keep_ids(batch, masked),
                             method="encode_image")
        v = self.model.apply(variables, batch["text"], method="encode_text")
        return u, v

    def forward(self, params, aux, batch, rng, masked=True) -> dict:
        """The outputs the objectives share: dict(image_emb, text_emb)."""
        u, v = self.embed(params, batch, rng, masked)
        return dict(image_emb=u, text_emb=v)

    def scalars(self, params):
        """The loss's learnable scalars: (logit_scale,) or (logit_scale, logit_bias)."""
        return self._itc.scalars(params)

    def itc(self, embeddings, scalars):
        """(loss, metrics) of the contrastive loss over the whole (sharded) batch."""
        return self._itc.loss_of(embeddings, scalars)

    # ---- Method interface -------------------------------------------------------------------
    def prepare_batch(self, batch: dict, rng: jax.Array) -> dict:
        """Random choices of inputs, made once per step before differentiation (so GradCache's
        micro-batches see the very masks of the full batch): FLIP's keep_ids [B, K], then the
        objectives' own preparation."""
        k_mask, k_obj = jax.random.split(rng)
        ids = self.keep_ids(k_mask, batch["image"])
        if ids is not None:
            batch = dict(batch, keep_ids=ids)
        return self.combiner.prepare_batch(batch, k_obj)

    def loss(self, params, aux, batch, rng, step, masked=True):
        """The combined objectives of a prepared batch: (loss, metrics, aux)."""
        k_fwd, k_obj = jax.random.split(rng)
        outputs = self.forward(params, aux, batch, k_fwd, masked)
        loss, metrics, _ = self.combiner(params, outputs, batch, k_obj, step, shared=aux)
        return loss, metrics, aux

    def value_and_grad(self, params, aux, batch, rng, step):
        """prepare_batch, then the gradient. FLIP unmasked tuning: `lax.cond` on the step
        picks the masked or the unmasked computation; both are compiled (their shapes
        differ), only one runs per step."""
        batch = self.prepare_batch(batch, self.prepare_key(rng))
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
        if mode == "none" or pieces == 1:
            def loss_fn(p):
                loss, metrics, new_aux = self.loss(p, aux, batch, rng, step, masked=masked)
                return loss, (metrics, new_aux)
            return jax.value_and_grad(loss_fn, has_aux=True)(params)
        term = self.combiner["itc"]
        k_fwd, _ = jax.random.split(rng)
        embed = functools.partial(self.embed, masked=masked)

        def itc(embeddings, scalars):
            loss, metrics = self.itc(embeddings, scalars)
            w = term.weight_at(step)
            return w * loss, named_metrics("itc", loss, metrics)

        if mode == "grad_cache":
            (loss, metrics), grads = grad_cache_value_and_grad(
                embed, self.scalars, itc, params, batch, k_fwd, pieces)
        else:
            def loss_of_batch(p, mb, key):
                return itc(embed(p, mb, key), self.scalars(p))
            (loss, metrics), grads = plain_accumulation_value_and_grad(
                loss_of_batch, params, batch, k_fwd, pieces)
        return (loss, (metrics, aux)), grads
