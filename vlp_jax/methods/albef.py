"""ALBEF (Li et al. 2021): align before fuse, with momentum distillation.

The model is `vlp_jax.models.fusion.FusionModel` (ALBEF cross-attention fusion, or the
ViLBERT / LXMERT co-attention option). Per step, for a batch of B pairs:

  ITC  u = norm(P_v ViT(x)_cls), w = norm(P_t BERT_1..N(t)_cls); the momentum (EMA) model gives
       u', w'. Image-to-text: p = softmax(u . [w' ; Q_t] / tau) against the targets
       alpha * softmax(u' . [w' ; Q_t] / tau) + (1 - alpha) * onehot (and text-to-image
       symmetrically), with feature queues Q_t, Q_v of past momentum features
       (`losses.distill.itc_with_queue`); tau learnable (as log tau, see models/fusion.py),
       clamped to [0.001, 0.5].
  ITM  one hard negative text per image and one hard negative image per text, drawn from
       softmax(similarity) with the positives excluded (`losses.itm.hard_negative_indices`);
       CE of the ITM head on the fused CLS for B positive and 2B negative pairs.
  MLM  15% of the caption masked (80/10/10), encoded by the text layers, fused with the image;
       L = (1 - alpha) CE + alpha * soft-CE against the momentum model's prediction.
  alpha ramps linearly from 0 over `alpha_ramp_steps` (`losses.distill.distill_alpha`).
  After the optimizer step the momentum model follows theta' <- m theta' + (1 - m) theta,
  m = 0.995, and the batch's momentum features are pushed into the queues.

Where things run. The loss works in the *global view*: arrays are the global batch and jit
partitions the computation over the mesh, so "momentum features gathered across devices before
enqueueing" and "hard negatives over the gathered batch" hold by construction (the queue push
and the negative sampling see all B rows). Only the ITC runs under `jax.shard_map`
(`method.itc_sharded=True`, the default): each device holds its n = B / devices rows of u, w and
the replicated global momentum features and queues, exactly the all-gather form of the other
contrastive losses. `itc_sharded=False` computes the same ITC in the global view (a test checks
the two agree).

State: aux = {teacher: EMA copy of every parameter subtree except the temperature and the ITM
head (placed like the parameters), image_queue, text_queue}.

config.method fields: queue_size (65536 in ALBEF; small in the experiments), momentum (0.995),
alpha (0.4), alpha_ramp_steps, mlm_prob (0.15), whole_word_masking, weights {itc, itm, mlm}
(1 each), temperature_range ((0.001, 0.5)), itc_sharded (True), exclude_duplicate_negatives
(True: captions identical to the positive are never drawn as ITM negatives).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vlp_jax.losses.distill import (distill_alpha, ema_update, itc_with_queue, queue_init,
                                    queue_push, queue_valid_mask)
from vlp_jax.losses.itm import hard_negative_indices, itm_loss
from vlp_jax.losses.mlm import mlm_loss, soft_mlm_loss
from vlp_jax.methods.base import Method, model_predict_fn
from vlp_jax.methods.vilt import mask_for_mlm
from vlp_jax.parallel.sharding import shard_batch_fn

STUDENT_ONLY = ("log_temperature", "itm_head")   # not averaged into the momentum model


def teacher_subtrees(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k not in STUDENT_ONLY}


@dataclasses.dataclass
class AlbefMethod(Method):

    def __post_init__(self):
        cfg = self.config
        m = cfg.get("momentum", 0.995)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"method.momentum must be in [0, 1), got {m}")
        if cfg.get("queue_size", 65536) < 1:
            raise ValueError(f"method.queue_size must be positive, got {cfg.queue_size}")
        lo, hi = cfg.get("temperature_range", (0.001, 0.5))
        if not 0.0 < lo < hi:
            raise ValueError(f"method.temperature_range must be 0 < lo < hi, got {(lo, hi)}")
        weights = dict(cfg.get("weights", None) or {})
        bad = set(weights) - {"itc", "itm", "mlm"}
        if bad:
            raise ValueError(f"method.weights has unknown terms {sorted(bad)}; valid: itc, itm, mlm")
        self._w = {k: float(weights.get(k, 1.0)) for k in ("itc", "itm", "mlm")}
        self._itc_sharded = shard_batch_fn(itc_with_queue, self.mesh, 2, 7)

    # ---- state ------------------------------------------------------------------------------
    def init_aux(self, params):
        size, dim = int(self.config.get("queue_size", 65536)), self.model.embed_dim
        # `+ 0` gives the teacher its own buffers (the train step donates the whole state).
        teacher = jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), teacher_subtrees(params))
        return {"teacher": teacher, "image_queue": queue_init(size, dim),
                "text_queue": queue_init(size, dim)}

    def aux_shardings(self, abstract_aux, param_shardings):
        rest = super().aux_shardings({k: v for k, v in abstract_aux.items() if k != "teacher"},
                                     param_shardings)
        return dict(rest, teacher=teacher_subtrees(param_shardings))

    def after_update(self, params, aux, step):
        teacher = ema_update(aux["teacher"], teacher_subtrees(params),
                             self.config.get("momentum", 0.995))
        return dict(aux, teacher=teacher)

    # ---- pieces -----------------------------------------------------------------------------
    def _apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    def temperature(self, params):
        lo, hi = self.config.get("temperature_range", (0.001, 0.5))
        return jnp.clip(jnp.exp(params["log_temperature"].astype(jnp.float32)), lo, hi)

    def itc(self, u, w, u_m, w_m, aux, temperature, alpha):
        """(loss, metrics): ITC with the momentum targets and the queues."""
        image_q, text_q = aux["image_queue"], aux["text_queue"]
        args = (u, w, u_m, w_m, image_q, text_q, queue_valid_mask(image_q), temperature, alpha)
        if self.config.get("itc_sharded", True):
            return self._itc_sharded(*args)
        return itc_with_queue(*args, axis_name=None)

    @staticmethod
    def _fused_heads(m, image_tokens, text_tokens, valid, num_itm):
        """One fusion pass over stacked pairs: ITM logits of the first `num_itm` rows, MLM
        logits of the rest."""
        fused_text, fused_image = m.fuse(image_tokens, text_tokens, valid)
        itm = m.itm_logits(fused_text[:num_itm],
                           None if fused_image is None else fused_image[:num_itm])
        return itm, m.mlm_logits(fused_text[num_itm:])

    def _itm_pairs(self, u, w, image_tokens, text_tokens, valid, temperature, rng, text):
        """Image tokens, text tokens and validity of the 3B ITM pairs: B positives, then each
        caption with a hard-negative image, then each image with a hard-negative caption.

        With `exclude_duplicate_negatives` (default), a candidate whose caption is token-for-
        token the positive's is not drawn as a negative (its logit is pushed to -1e4): such a
        pair matches, and labelling it "no match" teaches the ITM head noise. Web captions are
        rarely identical; a procedural world's often are.
        """
        sim_i2t = jax.lax.stop_gradient(u @ w.T / temperature)
        if self.config.get("exclude_duplicate_negatives", True):
            same = jnp.all(text[:, None, :] == text[None, :, :], axis=-1)    # [B, B]
            sim_i2t = jnp.where(same, sim_i2t - 1e4, sim_i2t)
        neg_text, neg_image = hard_negative_indices(rng, sim_i2t, sim_i2t.T, axis_name=None)
        return (jnp.concatenate([image_tokens, image_tokens[neg_image], image_tokens]),
                jnp.concatenate([text_tokens, text_tokens, text_tokens[neg_text]]),
                jnp.concatenate([valid, valid, valid[neg_text]]))

    # ---- Method interface -------------------------------------------------------------------
    def loss(self, params, aux, batch, rng, step):
        """ITC + ITM + MLM (see the module docstring). Each encoder runs once per model on
        stacked inputs (captions with their masked copies; the 3B ITM pairs with the B masked
        captions), which keeps the compiled step small."""
        cfg = self.config
        images, text = batch["image"], batch["text"]
        b = text.shape[0]
        k_itm, k_mlm = jax.random.split(rng)
        # The momentum model: teacher subtrees + (unused by it) the student-only leaves.
        teacher = dict(params, **jax.lax.stop_gradient(aux["teacher"]))
        temperature = self.temperature(params)
        alpha = distill_alpha(step, cfg.get("alpha", 0.4), cfg.get("alpha_ramp_steps", 0))
        inputs, targets, weights = mask_for_mlm(k_mlm, text, self.vocab,
                                                cfg.get("mlm_prob", 0.15),
                                                cfg.get("whole_word_masking", False))
        both = jnp.concatenate([text, inputs])

        u, image_tokens = self._apply(params, images, method="image_features")
        w2, text_tokens2, valid2 = self._apply(params, both, method="text_features")
        u_m, image_tokens_m = self._apply(teacher, images, method="image_features")
        w2_m, text_tokens2_m, valid2_m = self._apply(teacher, both, method="text_features")
        w, w_m = w2[:b], w2_m[:b]
        u_m, w_m, image_tokens_m, text_tokens2_m = jax.lax.stop_gradient(
            (u_m, w_m, image_tokens_m, text_tokens2_m))

        itc, metrics = self.itc(u, w, u_m, w_m, aux, temperature, alpha)

        pairs = self._itm_pairs(u, w, image_tokens, text_tokens2[:b], valid2[:b], temperature,
                                k_itm, text)
        itm_logits, mlm_logits = self._apply(
            params, jnp.concatenate([pairs[0], image_tokens]),
            jnp.concatenate([pairs[1], text_tokens2[b:]]),
            jnp.concatenate([pairs[2], valid2[b:]]), 3 * b, method=self._fused_heads)
        labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
        itm, itm_metrics = itm_loss(itm_logits, labels)

        _, mlm_logits_m = self._apply(teacher, image_tokens_m, text_tokens2_m[b:], valid2_m[b:],
                                      0, method=self._fused_heads)
        teacher_probs = jax.lax.stop_gradient(jax.nn.softmax(mlm_logits_m, axis=-1))
        ce, mlm_metrics = mlm_loss(mlm_logits, targets, weights)
        soft = soft_mlm_loss(mlm_logits, teacher_probs, weights)
        mlm = (1.0 - alpha) * ce + alpha * soft

        loss = self._w["itc"] * itc + self._w["itm"] * itm + self._w["mlm"] * mlm
        metrics = dict(metrics, **itm_metrics, **mlm_metrics, itc_loss=itc, itm_loss=itm,
                       mlm_loss=mlm, mlm_ce=ce, mlm_soft=soft, alpha=alpha,
                       temperature=temperature)
        new_aux = dict(aux, image_queue=queue_push(aux["image_queue"], u_m),
                       text_queue=queue_push(aux["text_queue"], w_m))
        return loss, metrics, new_aux

    def predict_fns(self):
        """The base encoders plus `score_pairs(params, images, tokens) -> [B]` (ITM head)."""
        return dict(super().predict_fns(), score_pairs=model_predict_fn(self.model, "score_pairs"))
