"""ALBEF (Li et al. 2021): align before fuse, with momentum distillation.

The model is `vlp_jax.models.fusion.FusionModel` (ALBEF cross-attention fusion, or the
ViLBERT / LXMERT co-attention option). Per step, for a batch of B pairs:

  ITC  u = norm(P_v ViT(x)_cls), w = norm(P_t BERT_1..N(t)_cls); the momentum (EMA) model gives
       u', w'. Image-to-text: p = softmax(u . [w' ; Q_t] / tau) against the targets
       alpha * softmax(u' . [w' ; Q_t] / tau) + (1 - alpha) * onehot (and text-to-image
       symmetrically), with feature queues Q_t, Q_v of past momentum features
       (`losses.distill.itc_with_queue`); tau learnable (as log tau, see models/fusion.py),
       clamped to `temperature_range` [0.001, 0.5] *after* each optimizer step
       (`project_params`, as ALBEF's `temp.clamp_` before each forward), so tau keeps its
       gradient at the bound.
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
head (placed like the parameters; `objectives.teacher.EmaTeacher` with an exclude-list),
image_queue, text_queue (`objectives.teacher.FeatureQueue`)}.

Objectives (`vlp_jax.objectives`): `itc`, `itm`, `mlm`, weighted by `weights` (or
`objectives.<name>.weight`, with start_step / ramp_steps); metrics `itc/...` (alpha,
temperature, accuracies), `itm/itm_acc`, `mlm/{mlm_acc, mlm_ce, mlm_soft}`, `loss/<name>`.
The MLM masks are drawn by `prepare_batch` before differentiation.

config.method fields: queue_size (65536 in ALBEF; small in the experiments), momentum (0.995),
alpha (0.4), alpha_ramp_steps, mlm_prob (0.15), whole_word_masking, weights {itc, itm, mlm}
(1 each), objectives, temperature_range ((0.001, 0.5)), itc_sharded (True),
exclude_duplicate_negatives (False, as ALBEF and LAVIS: True never draws a caption identical
to the positive as an ITM negative; an addition of this library for procedural data, whose
captions often repeat).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from vlp_jax.losses.distill import distill_alpha, itc_with_queue
from vlp_jax.losses.itm import hard_negative_indices, itm_loss
from vlp_jax.losses.mlm import mlm_loss, soft_mlm_loss
from vlp_jax.methods.base import Method
from vlp_jax.methods.fusion_common import fusion_predict_fns
from vlp_jax.objectives.core import Combiner, FnObjective, Term, override_terms
from vlp_jax.objectives.masking import MlmMasking, require_prepared
from vlp_jax.objectives.teacher import EmaTeacher, FeatureQueue
from vlp_jax.parallel.sharding import shard_batch_fn
from vlp_jax.methods.registry import register_method

STUDENT_ONLY = ("log_temperature", "itm_head")   # not averaged into the momentum model
TERMS = ("itc", "itm", "mlm")


def teacher_subtrees(tree: dict) -> dict:
    return EmaTeacher(0.0, exclude=STUDENT_ONLY).select(tree)


@register_method("albef")
@dataclasses.dataclass
class AlbefMethod(Method):

    def __post_init__(self):
        cfg = self.config
        if cfg.get("queue_size", 65536) < 1:
            raise ValueError(f"method.queue_size must be positive, got {cfg.queue_size}")
        lo, hi = cfg.get("temperature_range", (0.001, 0.5))
        if not 0.0 < lo < hi:
            raise ValueError(f"method.temperature_range must be 0 < lo < hi, got {(lo, hi)}")
        weights = dict(cfg.get("weights", None) or {})
        bad = set(weights) - set(TERMS)
        if bad:
            raise ValueError(f"method.weights has unknown terms {sorted(bad)}; valid: itc, itm, mlm")
        self.ema = EmaTeacher(float(cfg.get("momentum", 0.995)), exclude=STUDENT_ONLY)
        self.queue = FeatureQueue(int(cfg.get("queue_size", 65536)), self.model.embed_dim)
        self.masking = MlmMasking(self.vocab, cfg.get("mlm_prob", 0.15),
                                  cfg.get("whole_word_masking", False))
        self._itc_sharded = shard_batch_fn(itc_with_queue, self.mesh, 2, 7)
        terms = [Term(FnObjective("itc", self._itc_objective)),
                 Term(FnObjective("itm", self._itm_objective)),
                 Term(FnObjective("mlm", self._mlm_objective))]
        terms = [dataclasses.replace(t, weight=float(weights.get(t.name, 1.0))) for t in terms]
        self.combiner = Combiner(override_terms(terms, cfg.get("objectives", None)))

    # ---- state ------------------------------------------------------------------------------
    def init_aux(self, params):
        return {"teacher": self.ema.init(params), "image_queue": self.queue.init(),
                "text_queue": self.queue.init()}

    def aux_shardings(self, abstract_aux, param_shardings):
        rest = super().aux_shardings({k: v for k, v in abstract_aux.items() if k != "teacher"},
                                     param_shardings)
        return dict(rest, teacher=self.ema.shardings(param_shardings))

    def after_update(self, params, aux, step):
        return dict(aux, teacher=self.ema.update(aux["teacher"], params))

    def project_params(self, params):
        """Clamps tau = exp(log_temperature) into `temperature_range` after the update."""
        lo, hi = self.config.get("temperature_range", (0.001, 0.5))
        t = params["log_temperature"]
        return dict(params, log_temperature=jnp.clip(t, math.log(lo), math.log(hi)).astype(
            t.dtype))

    # ---- pieces -----------------------------------------------------------------------------
    def _apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    def temperature(self, params):
        """tau = exp(log_temperature), unclamped (the bound is enforced by project_params)."""
        return jnp.exp(params["log_temperature"].astype(jnp.float32))

    def alpha(self, step):
        cfg = self.config
        return distill_alpha(step, cfg.get("alpha", 0.4), cfg.get("alpha_ramp_steps", 0))

    def itc(self, u, w, u_m, w_m, aux, temperature, alpha):
        """(loss, metrics): ITC with the momentum targets and the queues."""
        image_q, text_q = aux["image_queue"], aux["text_queue"]
        args = (u, w, u_m, w_m, image_q, text_q, self.queue.valid(image_q), temperature, alpha)
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

        With `exclude_duplicate_negatives` (default False, as ALBEF / LAVIS), a candidate whose
        caption is token-for-token the positive's is not drawn as a negative (its logit is
        pushed to -1e4): such a pair matches, and labelling it "no match" teaches the ITM head
        noise. Web captions are rarely identical; a procedural world's often are.
        """
        sim_i2t = jax.lax.stop_gradient(u @ w.T / temperature)
        if self.config.get("exclude_duplicate_negatives", False):
            same = jnp.all(text[:, None, :] == text[None, :, :], axis=-1)    # [B, B]
            sim_i2t = jnp.where(same, sim_i2t - 1e4, sim_i2t)
        neg_text, neg_image = hard_negative_indices(rng, sim_i2t, sim_i2t.T, axis_name=None)
        return (jnp.concatenate([image_tokens, image_tokens[neg_image], image_tokens]),
                jnp.concatenate([text_tokens, text_tokens, text_tokens[neg_text]]),
                jnp.concatenate([valid, valid, valid[neg_text]]))

    def forward(self, params, aux, batch, rng):
        """The outputs the objectives share. Each encoder runs once per model on stacked
        inputs (captions with their masked copies; the 3B ITM pairs with the B masked
        captions), which keeps the compiled step small.

        Returns dict(u, w, u_m, w_m [B, D], itm_logits [3B, 2], itm_labels [3B],
        mlm_logits, mlm_logits_m [B, L, V], temperature [])."""
        images, text = batch["image"], batch["text"]
        b = text.shape[0]
        # The momentum model: teacher subtrees + (unused by it) the student-only leaves.
        teacher = self.ema.full_params(params, aux["teacher"])
        temperature = self.temperature(params)
        both = jnp.concatenate([text, batch["mlm_inputs"]])

        u, image_tokens = self._apply(params, images, method="image_features")
        w2, text_tokens2, valid2 = self._apply(params, both, method="text_features")
        u_m, image_tokens_m = self._apply(teacher, images, method="image_features")
        w2_m, text_tokens2_m, valid2_m = self._apply(teacher, both, method="text_features")
        w, w_m = w2[:b], w2_m[:b]
        u_m, w_m, image_tokens_m, text_tokens2_m = jax.lax.stop_gradient(
            (u_m, w_m, image_tokens_m, text_tokens2_m))

        pairs = self._itm_pairs(u, w, image_tokens, text_tokens2[:b], valid2[:b], temperature,
                                rng, text)
        itm_logits, mlm_logits = self._apply(
            params, jnp.concatenate([pairs[0], image_tokens]),
            jnp.concatenate([pairs[1], text_tokens2[b:]]),
            jnp.concatenate([pairs[2], valid2[b:]]), 3 * b, method=self._fused_heads)
        labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
        _, mlm_logits_m = self._apply(teacher, image_tokens_m, text_tokens2_m[b:], valid2_m[b:],
                                      0, method=self._fused_heads)
        return dict(u=u, w=w, u_m=u_m, w_m=w_m, itm_logits=itm_logits, itm_labels=labels,
                    mlm_logits=mlm_logits, mlm_logits_m=jax.lax.stop_gradient(mlm_logits_m),
                    temperature=temperature)

    # ---- objectives -------------------------------------------------------------------------
    def _itc_objective(self, inp):
        o, alpha = inp.outputs, self.alpha(inp.step)
        loss, metrics = self.itc(o["u"], o["w"], o["u_m"], o["w_m"], inp.shared,
                                 o["temperature"], alpha)
        return loss, dict(metrics, alpha=alpha, temperature=o["temperature"])

    def _itm_objective(self, inp):
        return itm_loss(inp.outputs["itm_logits"], inp.outputs["itm_labels"])

    def _mlm_objective(self, inp):
        """(1 - alpha) CE + alpha soft-CE against the momentum model's prediction."""
        o, b, alpha = inp.outputs, inp.batch, self.alpha(inp.step)
        teacher_probs = jax.nn.softmax(o["mlm_logits_m"], axis=-1)
        ce, metrics = mlm_loss(o["mlm_logits"], b["mlm_targets"], b["mlm_weights"])
        soft = soft_mlm_loss(o["mlm_logits"], teacher_probs, b["mlm_weights"])
        return (1.0 - alpha) * ce + alpha * soft, dict(metrics, mlm_ce=ce, mlm_soft=soft)

    # ---- Method interface -------------------------------------------------------------------
    def prepare_batch(self, batch, rng):
        """MLM masks of the captions, drawn once per step before differentiation."""
        return self.masking(batch, rng)

    def loss(self, params, aux, batch, rng, step):
        """ITC + ITM + MLM of a prepared batch (see the module docstring); the queues take the
        batch's momentum features."""
        require_prepared(batch, who="ALBEF")
        k_fwd, k_obj = jax.random.split(rng)
        outputs = self.forward(params, aux, batch, k_fwd)
        loss, metrics, _ = self.combiner(params, outputs, batch, k_obj, step, shared=aux)
        new_aux = dict(aux, image_queue=self.queue.push(aux["image_queue"], outputs["u_m"]),
                       text_queue=self.queue.push(aux["text_queue"], outputs["w_m"]))
        return loss, metrics, new_aux

    def predict_fns(self):
        """The encoders plus `score_pairs(params, images, tokens) -> [B]` (ITM head)."""
        return fusion_predict_fns(self.model)
