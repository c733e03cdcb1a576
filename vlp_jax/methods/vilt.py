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

config.method fields: objectives, mixing, weights {name: w} (wpa 0.1, others 1),
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

import jax
import jax.numpy as jnp

from vlp_jax.losses.itm import itm_loss, random_negative_indices
from vlp_jax.losses.mlm import mask_tokens, mlm_loss
from vlp_jax.losses.mrm import (codebook_targets, kmeans_codebook, mask_patches, mrc_kl_loss,
                                mrc_loss, mrfr_loss)
from vlp_jax.losses.ot import wpa_loss
from vlp_jax.losses.task_sampler import mix_losses
from vlp_jax.methods.base import Method, model_predict_fn
from vlp_jax.nn.patch_embed import patchify

OBJECTIVES = ("mlm", "itm", "wpa", "mrfr", "mrc", "mrc_kl")
MIXING = ("sum", "sample")
DEFAULT_WEIGHTS = dict(wpa=0.1)


def mlm_special_ids(vocab: dict) -> tuple[int, ...]:
    """Token ids that are never masked: pad, bos, eos (and the mask id itself)."""
    return tuple(int(vocab[k]) for k in ("pad_id", "bos_id", "eos_id", "mask_id") if k in vocab)


def mask_for_mlm(rng, tokens, vocab: dict, prob: float, whole_word: bool):
    """(inputs, targets, weights) of BERT masking with the tokenizer's ids."""
    missing = [k for k in ("mask_id", "vocab_size", "pad_id") if k not in vocab]
    if missing:
        raise ValueError(f"MLM needs the tokenizer ids {missing} in the method's vocab")
    word_start = vocab.get("word_start") if whole_word else None
    if whole_word and word_start is None:
        raise ValueError("method.whole_word_masking=True needs the tokenizer's word_start table "
                         "(vocab['word_start'], bool [vocab_size]) in the method's vocab")
    if word_start is not None:
        word_start = jnp.asarray(word_start, bool)
    return mask_tokens(rng, tokens, mask_id=int(vocab["mask_id"]),
                       vocab_size=int(vocab["vocab_size"]), special_ids=mlm_special_ids(vocab),
                       prob=prob, word_start=word_start)


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


@dataclasses.dataclass
class ViltMethod(Method):

    def __post_init__(self):
        cfg = self.config
        objectives = tuple(cfg.get("objectives", ("mlm", "itm", "wpa")))
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
        self._objectives = objectives
        self._tasks = tuple(o for o in objectives if o != "wpa")
        weights = dict(cfg.get("weights", None) or {})
        bad = set(weights) - set(OBJECTIVES)
        if bad:
            raise ValueError(f"method.weights has unknown objectives {sorted(bad)}; valid: "
                             f"{OBJECTIVES}")
        self._weights = {o: float(weights.get(o, DEFAULT_WEIGHTS.get(o, 1.0))) for o in objectives}
        starts = dict(cfg.get("start_steps", None) or {})
        bad = {k: v for k, v in starts.items() if k not in objectives or int(v) < 0}
        if bad:
            raise ValueError(f"method.start_steps {bad}: keys must be in method.objectives "
                             f"{objectives} and steps >= 0")
        self._starts = {k: int(v) for k, v in starts.items()}
        if mixing == "sample":
            ratios = dict(cfg.get("task_ratios", None) or {})
            bad = set(ratios) - set(self._tasks)
            if bad:
                raise ValueError(f"method.task_ratios names tasks {sorted(bad)} that are not in "
                                 f"method.objectives (tasks: {self._tasks})")
            self._ratios = tuple(float(ratios.get(t, 1.0)) for t in self._tasks)
            if min(self._ratios) < 0 or sum(self._ratios) <= 0:
                raise ValueError(f"method.task_ratios must be >= 0 with a positive sum, got {ratios}")
        for key in ("mlm_prob", "mrm_prob"):
            p = cfg.get(key, 0.15)
            if not 0.0 < p < 1.0:
                raise ValueError(f"method.{key} must be in (0, 1), got {p}")
        self._codebook = bool({"mrc", "mrc_kl"} & set(objectives))

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

    def _mlm(self, params, batch, rng):
        inputs, targets, weights = mask_for_mlm(rng, batch["text"], self.vocab,
                                                self.config.get("mlm_prob", 0.15),
                                                self.config.get("whole_word_masking", False))
        logits = self._apply(params, batch["image"], inputs,
                             method=lambda m, x, t: m.mlm_logits(m.encode(x, t)["text"]))
        return mlm_loss(logits, targets, weights)

    def _weight(self, name, step):
        """weights[name], or 0 before start_steps[name]."""
        w = self._weights[name]
        if name not in self._starts:
            return w
        return jnp.where(jnp.asarray(step) >= self._starts[name], w, 0.0)

    def _itm(self, params, batch, rng, step):
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
        loss, metrics = itm_loss(logits, labels)
        metrics = dict(metrics, itm_loss=loss)
        loss = self._weight("itm", step) * loss
        if "wpa" in self._objectives:
            image_mask = jnp.ones(out["image"].shape[:2], bool)
            if self.model.image_cls:
                image_mask = image_mask.at[:, 0].set(False)
            wpa, wpa_metrics = wpa_loss(out["text"], wpa_text_mask(out["text_valid"]),
                                        out["image"], image_mask, labels == 1)
            loss = loss + self._weight("wpa", step) * wpa
            metrics = dict(metrics, **wpa_metrics, wpa_loss=wpa)
        return loss, metrics

    def _region(self, params, aux, batch, rng, kind):
        images = batch["image"]
        b, n = images.shape[0], self.model.num_patches
        mask = mask_patches(rng, b, n, self.config.get("mrm_prob", 0.15))

        def forward(m, x, t, pm):
            patches = m.image_patches(m.encode(x, t, pm)["image"])
            return m.mrfr_pred(patches) if kind == "mrfr" else m.mrc_logits(patches)
        pred = self._apply(params, images, batch["text"], mask, method=forward)
        targets = patchify(images.astype(jnp.float32), self.model.patch_size)
        if kind == "mrfr":
            return mrfr_loss(pred, targets, mask)
        ids, probs = codebook_targets(targets, aux["codebook"],
                                      self.config.get("mrc_temperature", 1.0))
        if kind == "mrc":
            return mrc_loss(pred, ids, mask)
        return mrc_kl_loss(pred, probs, mask)

    def _task_fn(self, name, params, aux, batch, rng, step):
        """A zero-argument function returning one task's weighted loss and its metrics
        (`<task>_loss` unweighted; the ITM task also carries the weighted WPA term)."""
        def run():
            if name == "itm":
                return self._itm(params, batch, rng, step)
            if name == "mlm":
                out = self._mlm(params, batch, rng)
            else:
                out = self._region(params, aux, batch, rng, name)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            return self._weight(name, step) * loss, dict(metrics, **{f"{name}_loss": loss})
        return run

    # ---- Method interface -------------------------------------------------------------------
    def loss(self, params, aux, batch, rng, step):
        k_code, k_mix, *keys = jax.random.split(rng, 2 + len(self._tasks))
        aux = self._fitted_codebook(aux, batch["image"], k_code)
        fns = [self._task_fn(t, params, aux, batch, k, step)
               for t, k in zip(self._tasks, keys)]
        if self.config.get("mixing", "sum") == "sample":
            loss, metrics = mix_losses(k_mix, fns, self._ratios)
            return loss, metrics, aux
        total, metrics = 0.0, {}
        for fn in fns:
            loss, m = fn()
            total = total + loss
            metrics.update(m)
        return total, metrics, aux

    def predict_fns(self):
        """The base encoders plus `score_pairs(params, images, tokens) -> [B]` (ITM head)."""
        return dict(super().predict_fns(), score_pairs=model_predict_fn(self.model, "score_pairs"))
