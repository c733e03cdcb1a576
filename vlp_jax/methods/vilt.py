"""ViLT (Kim et al. 2021) pretraining, with UNITER's (Chen et al. 2020) objectives as options.

The model is `vlp_jax.models.single_stream.SingleStreamTransformer`. Objectives (each a pure
function in `vlp_jax.losses`):

  mlm     masked language modelling with the true image: 15% of the caption's tokens (whole
          words when `whole_word_masking` and the tokenizer's `word_start` table exist),
          80/10/10 mask/random/keep                                        (`losses.mlm`)
  itm     image-text matching: for half of the pairs (a random half, exactly B/2) the image is
          replaced by a random other image of the batch; CE on Dense(2) of the pooled output
  wpa     word-patch alignment (UNITER's WRA): IPOT optimal-transport distance between the ITM
          forward's text and image tokens, pulled down for matched and pushed up for
          mismatched pairs; the text CLS, the last text token (eos), padding and the image
          class token are masked out                                       (`losses.ot`)
  mrfr    masked region feature regression: 15% of the patches zeroed (UNITER), their pixels
          regressed through the head tied to the patch projection          (`losses.mrm`)
  mrc     masked region classification: CE against the class of the masked patch
  mrc_kl  the same against a soft class distribution (KL)

Region classes without a detector: a frozen k-means codebook of patch pixels. K =
model.num_mrc_classes centroids are fitted ONCE, on the first training batch's patches (the
trainer's init batch is all zeros, so the fit happens in the first step, under a `lax.cond`
that never runs again); they live in aux['codebook'] and are never trained. A patch's class is
its nearest centroid (mrc) and its soft distribution softmax(-||x - c_k||^2 / T) (mrc_kl,
T = `mrc_temperature`), standing in for the detector's argmax class and class distribution.

Combining objectives:
  mixing='sum' (ViLT):  L = sum_o weight_o * L_o over `objectives` every step
                        (ViLT's recipe: MLM + ITM + 0.1 * WPA).
  mixing='sample' (UNITER): one task per step drawn with probabilities ~ `task_ratios`
                        (`losses.task_sampler.mix_losses`), its loss weighted as above (WPA
                        rides with the ITM task: weight_itm * ITM + weight_wpa * WPA), with
                        conditional masking: the MLM task masks only the text, the region tasks
                        only the image, ITM masks nothing.

On the objectives seam (`vlp_jax.objectives`): each objective above is a term of one
`Combiner` ('sum' or 'sample' mixing; WPA is a rider of the ITM task and reads the ITM pairs'
forward, computed once per branch through `LazyOutputs`); MLM masks and the region masks are
drawn by `prepare_batch` before differentiation. Metrics: `loss/<objective>` (unweighted),
`<objective>/<metric>` (e.g. `itm/itm_acc`, `mlm/mlm_acc`), `weight/<objective>` for scheduled
terms, `task_id` when sampling.

config.method fields: objectives (a list of names, or a mapping {name: {weight, start_step,
ramp_steps}} over those names), mixing, weights {name: w} (wpa 0.1, others 1),
start_steps {name: N} (that objective's weight is 0 before step N, its loss still computed and
logged: a curriculum; experiments/vilt_shapes.py starts MLM after an ITM-only warm-up, which
from scratch lets ITM leave its chance plateau), task_ratios {task: r}, mlm_prob (0.15),
whole_word_masking (False), mrm_prob (0.15), mrc_temperature (1.0), kmeans_iterations (10).

Evaluation encoders: `encode_image` / `encode_text` are the shared transformer run on one
modality alone, mean-pooled and L2-normalised (ViLT has no contrastive head, so this first-stage
ranking is weak; `itm_rerank_retrieval` re-scores its top-k with `score_pairs` = ITM
logit(match) - logit(no match)).

Everything is computed in the global view (arrays are the global batch; jit partitions them),
so no collective is written by hand.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vlp_jax.losses.itm import itm_loss, random_negative_indices
from vlp_jax.losses.mlm import mlm_loss
from vlp_jax.losses.mrm import (codebook_targets, kmeans_codebook, mask_patches, mrc_kl_loss,
                                mrc_loss, mrfr_loss)
from vlp_jax.losses.ot import wpa_loss
from vlp_jax.methods.base import Method
from vlp_jax.methods.fusion_common import fusion_predict_fns
from vlp_jax.nn.patch_embed import patchify
from vlp_jax.objectives.core import Combiner, FnObjective, LazyOutputs, Term, override_terms
from vlp_jax.objectives.masking import MlmMasking, require_prepared
from vlp_jax.objectives.masking import mask_for_mlm, mlm_special_ids  # noqa: F401 (re-exported)
from vlp_jax.methods.registry import register_method

OBJECTIVES = ("mlm", "itm", "wpa", "mrfr", "mrc", "mrc_kl")
REGION = ("mrfr", "mrc", "mrc_kl")
MIXING = ("sum", "sample")
DEFAULT_WEIGHTS = dict(wpa=0.1)


def wpa_text_mask(valid: jax.Array) -> jax.Array:
    """Text tokens that take part in WPA: valid, not the first (CLS/bos) nor the last valid
    (eos) token. bool [B, L]."""
    last = jnp.maximum(valid.sum(-1) - 1, 0)
    pos = jnp.arange(valid.shape[1])[None]
    return valid & (pos > 0) & (pos != last[:, None])


def half_positive_labels(rng, batch: int) -> jax.Array:
    """int32 [B] with exactly ceil(B/2) ones at random positions (1 = matched pair)."""
    ordered = (jnp.arange(batch) < (batch + 1) // 2).astype(jnp.int32)
    return jax.random.permutation(rng, ordered)


@register_method("vilt")
@dataclasses.dataclass
class ViltMethod(Method):

    def __post_init__(self):
        cfg = self.config
        section = cfg.get("objectives", ("mlm", "itm", "wpa"))
        overrides = dict(section) if isinstance(section, Mapping) else {}
        objectives = tuple(section)
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown or not objectives:
            raise ValueError(f"method.objectives has unknown or no entries {sorted(unknown)}; "
                             f"valid: {OBJECTIVES}")
        if "wpa" in objectives and "itm" not in objectives:
            raise ValueError("method.objectives: 'wpa' is computed on the ITM pairs; add 'itm'")
        if {"mrc", "mrc_kl"} & set(objectives) and not self.model.num_mrc_classes:
            raise ValueError("method.objectives 'mrc'/'mrc_kl' need model.num_mrc_classes > 0 "
                             "(the size of the k-means patch codebook)")
        mixing = cfg.get("mixing", "sum")
        if mixing not in MIXING:
            raise ValueError(f"method.mixing must be one of {MIXING}, got {mixing!r}")
        weights = dict(cfg.get("weights", None) or {})
        bad = set(weights) - set(OBJECTIVES)
        if bad:
            raise ValueError(f"method.weights has unknown objectives {sorted(bad)}; valid: "
                             f"{OBJECTIVES}")
        starts = dict(cfg.get("start_steps", None) or {})
        bad = {k: v for k, v in starts.items() if k not in objectives or int(v) < 0}
        if bad:
            raise ValueError(f"method.start_steps {bad}: keys must be in method.objectives "
                             f"{objectives} and steps >= 0")
        mrm_prob = cfg.get("mrm_prob", 0.15)
        if not 0.0 < mrm_prob < 1.0:
            raise ValueError(f"method.mrm_prob must be in (0, 1), got {mrm_prob}")
        self._objectives = objectives
        self._codebook = bool({"mrc", "mrc_kl"} & set(objectives))
        self.masking = MlmMasking(self.vocab, cfg.get("mlm_prob", 0.15),
                                  cfg.get("whole_word_masking", False)) if "mlm" in objectives \
            else None
        fns = dict(mlm=self._mlm, itm=self._itm, wpa=self._wpa, mrfr=self._region("mrfr"),
                   mrc=self._region("mrc"), mrc_kl=self._region("mrc_kl"))
        terms = [Term(FnObjective(o, fns[o]),
                      weight=float(weights.get(o, DEFAULT_WEIGHTS.get(o, 1.0))),
                      start_step=int(starts.get(o, 0)), task="itm" if o == "wpa" else None)
                 for o in objectives]
        terms = override_terms(terms, overrides)
        ratios = dict(cfg.get("task_ratios", None) or {}) if mixing == "sample" else None
        if ratios:
            tasks = tuple(o for o in objectives if o != "wpa")
            bad = set(ratios) - set(tasks)
            if bad:
                raise ValueError(f"method.task_ratios names tasks {sorted(bad)} that are not in "
                                 f"method.objectives (tasks: {tasks})")
        self.combiner = Combiner(terms, mixing, ratios)

    # ---- state ------------------------------------------------------------------------------
    def init_aux(self, params):
        if not self._codebook:
            return {}
        p = self.model.patch_size
        return {"codebook": jnp.zeros((self.model.num_mrc_classes, p * p * 3), jnp.float32),
                "codebook_ready": jnp.zeros((), jnp.bool_)}

    def _fitted_codebook(self, aux, images, rng):
        """aux with the k-means codebook fitted on `images`' patches if not fitted yet."""
        if not self._codebook:
            return aux
        patches = patchify(images.astype(jnp.float32), self.model.patch_size)
        patches = patches.reshape(-1, patches.shape[-1])
        iterations = int(self.config.get("kmeans_iterations", 10))
        centroids = jax.lax.cond(
            aux["codebook_ready"], lambda: aux["codebook"],
            lambda: kmeans_codebook(rng, patches, self.model.num_mrc_classes,
                                    iterations).astype(jnp.float32))
        return dict(aux, codebook=jax.lax.stop_gradient(centroids),
                    codebook_ready=jnp.ones((), jnp.bool_))

    # ---- forward helpers --------------------------------------------------------------------
    def _apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    def _weight(self, name, step):
        """The combiner's weight of `name` at `step` (0 before its start step)."""
        return self.combiner[name].weight_at(step)

    def _itm_forward(self, params, batch, rng):
        """The ITM pairs (a random half matched, the rest with a random other image) through the
        transformer: dict(out = the encoder's outputs, logits [B, 2], labels int32 [B])."""
        images, text = batch["image"], batch["text"]
        b = images.shape[0]
        k_neg, k_lab = jax.random.split(rng)
        labels = half_positive_labels(k_lab, b)
        negatives = random_negative_indices(k_neg, b, b, jnp.zeros((), jnp.int32))
        pair_images = images[jnp.where(labels == 1, jnp.arange(b), negatives)]

        def forward(m, x, t):
            out = m.encode(x, t)
            return out, m.itm_logits(out["pooled"])
        out, logits = self._apply(params, pair_images, text, method=forward)
        return dict(out=out, logits=logits, labels=labels)

    # ---- objectives (each: ObjectiveInput -> (loss, metrics)) -------------------------------
    def _mlm(self, inp):
        b = inp.batch
        logits = self._apply(inp.params, b["image"], b["mlm_inputs"],
                             method=lambda m, x, t: m.mlm_logits(m.encode(x, t)["text"]))
        return mlm_loss(logits, b["mlm_targets"], b["mlm_weights"])

    def _itm(self, inp):
        pairs = inp.outputs["itm"]
        return itm_loss(pairs["logits"], pairs["labels"])

    def _wpa(self, inp):
        pairs = inp.outputs["itm"]
        out = pairs["out"]
        image_mask = jnp.ones(out["image"].shape[:2], bool)
        if self.model.image_cls:
            image_mask = image_mask.at[:, 0].set(False)
        return wpa_loss(out["text"], wpa_text_mask(out["text_valid"]), out["image"], image_mask,
                        pairs["labels"] == 1)

    def _region(self, kind):
        def objective(inp):
            images, mask = inp.batch["image"], inp.batch["mrm_mask"]

            def forward(m, x, t, pm):
                patches = m.image_patches(m.encode(x, t, pm)["image"])
                return m.mrfr_pred(patches) if kind == "mrfr" else m.mrc_logits(patches)
            pred = self._apply(inp.params, images, inp.batch["text"], mask, method=forward)
            targets = patchify(images.astype(jnp.float32), self.model.patch_size)
            if kind == "mrfr":
                out = mrfr_loss(pred, targets, mask)
            else:
                ids, probs = codebook_targets(targets, inp.shared["codebook"],
                                              self.config.get("mrc_temperature", 1.0))
                out = mrc_loss(pred, ids, mask) if kind == "mrc" else mrc_kl_loss(pred, probs,
                                                                                  mask)
            return out if isinstance(out, tuple) else (out, {})
        return objective

    # ---- Method interface -------------------------------------------------------------------
    def prepare_batch(self, batch, rng):
        """Drawn once per step before differentiation: the MLM masks of the captions
        (mlm_inputs / mlm_targets / mlm_weights) and the masked patches of the region tasks
        (mrm_mask bool [B, N]). With task sampling each task reads only its own modality's
        masks (UNITER's conditional masking)."""
        k_mlm, k_mrm = jax.random.split(rng)
        if self.masking is not None:
            batch = self.masking(batch, k_mlm)
        if set(REGION) & set(self._objectives):
            batch = dict(batch, mrm_mask=mask_patches(k_mrm, batch["image"].shape[0],
                                                      self.model.num_patches,
                                                      self.config.get("mrm_prob", 0.15)))
        return batch

    def loss(self, params, aux, batch, rng, step):
        """The combined objectives of a prepared batch: (loss, metrics, aux with the codebook
        fitted on the first batch)."""
        if self.masking is not None:
            require_prepared(batch, who="ViLT")
        k_code, k_itm, k_obj = jax.random.split(rng, 3)
        aux = self._fitted_codebook(aux, batch["image"], k_code)
        outputs = LazyOutputs(producers={"itm": lambda: self._itm_forward(params, batch, k_itm)})
        loss, metrics, _ = self.combiner(params, outputs, batch, k_obj, step, shared=aux)
        return loss, metrics, aux

    def predict_fns(self):
        """The encoders plus `score_pairs(params, images, tokens) -> [B]` (ITM head)."""
        return fusion_predict_fns(self.model)
