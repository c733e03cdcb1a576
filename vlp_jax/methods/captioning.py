"""Generative pretraining: GIT, SimVLM and CoCa through one method.

    L = lambda_cap * CE_caption  (+ lambda_con * ITC when the model has contrastive embeddings:
                                  CoCa eq. 4, lambda_con = 1, lambda_cap = 2)

The model (`vlp_jax.models.generation`'s protocol) returns teacher-forcing outputs; the
objectives are `objectives.captioning.CaptionObjective` (label smoothing; SimVLM's PrefixLM
draw of prefix lengths in its prepare_batch) and, for CoCa, the contrastive objective of the
dual encoders (gathered over the devices). Weights and schedules come from `method.objectives`.

Predict functions: `generate(params, images) -> tokens` (cached decoding, `method.decoding`),
with a model whose prefill reads a prompt (the encoder-decoder) `generate_prompted(params,
images, prompts) -> tokens` (VL-T5: the batch's `prompt` is the encoder's task input),
`score_pairs(params, images, tokens) -> mean log-likelihood` (zero-shot by likelihood,
re-ranking, compositional swaps) and, with a contrastive head, `encode_image` / `encode_text`.
"""
from __future__ import annotations

import dataclasses
import inspect

from vlp_jax.methods.base import Method, model_predict_fn
from vlp_jax.methods.contrastive import clamp_logit_scale
from vlp_jax.methods.registry import register_method
from vlp_jax.models.generation import generate_fn, prompted_generate_fn, score_fn
from vlp_jax.objectives.captioning import CaptionObjective
from vlp_jax.objectives.contrastive import ContrastiveObjective
from vlp_jax.objectives.core import Combiner, Term, override_terms

MODEL_INPUTS = ("prefix_len", "prompt")   # batch keys passed to the model when present


def has_contrastive_head(model) -> bool:
    return hasattr(model, "encode_image") and hasattr(model, "encode_text")


def takes_prompt(model) -> bool:
    """True where the model's prefill reads a task prompt (the encoder-decoder: VL-T5)."""
    return "prompt" in inspect.signature(model.prefill).parameters


@register_method("captioning")
@dataclasses.dataclass
class CaptioningMethod(Method):

    def __post_init__(self):
        cfg = self.config
        terms = [Term(CaptionObjective(self.vocab, cfg.get("label_smoothing", 0.0),
                                       cfg.get("prefix_fraction", 0.0)))]
        if has_contrastive_head(self.model):
            terms.insert(0, Term(ContrastiveObjective(self.mesh, cfg.get("loss", "softmax"))))
        self.combiner = Combiner(override_terms(terms, cfg.get("objectives", None)))

    def prepare_batch(self, batch, rng):
        return self.combiner.prepare_batch(batch, rng)

    def loss(self, params, aux, batch, rng, step):
        extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        outputs = self.model.apply({"params": params}, batch["image"], batch["text"], **extra)
        loss, metrics, _ = self.combiner(params, outputs, batch, rng, step)
        return loss, metrics, aux

    def project_params(self, params):
        """CoCa's logit scale clamped into [0, ln 100] after the update, as CLIP's."""
        return clamp_logit_scale(params)

    def decoding(self) -> dict:
        """method.decoding with its defaults (max_length: the model's context length)."""
        d = dict(self.config.get("decoding", None) or {})
        d.setdefault("max_length", self.model.context_length)
        return d

    def predict_fns(self):
        fns = {"generate": generate_fn(self.model, self.vocab, **self.decoding()),
               "score_pairs": score_fn(self.model)}
        if takes_prompt(self.model):
            fns["generate_prompted"] = prompted_generate_fn(self.model, self.vocab,
                                                            **self.decoding())
        if has_contrastive_head(self.model):
            fns.update({name: model_predict_fn(self.model, name)
                        for name in ("encode_image", "encode_text")})
        return fns
