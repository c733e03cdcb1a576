"""Captioning evaluation: generate a caption per test image with the method's `generate`
predict function and score it against the split's reference captions (BLEU-1..4, CIDEr-D)
and, on the shapes world, against the scene itself (`caption_metrics.attribute_accuracy`: is
the named colour, shape, count, relation right), which tells far more there than n-gram
overlap with template captions.

Metrics: bleu1..bleu4, cider (x100, the usual reporting scale), the attribute accuracies
(percent, with `chance_main_object`), mean_length (words per generated caption), seconds
(generation wall time, compilation included in the first call only).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from vlp_jax.config_schema import resolve_entry
from vlp_jax.evaluators.caption_metrics import caption_scores, normalize_caption
from vlp_jax.evaluators.embed import map_in_batches
from vlp_jax.evaluators.protocol import PredictFns, detokenizer, require

_log = logging.getLogger(__name__)


def evaluate_captioning(config: Mapping[str, Any], predict: PredictFns, load_eval_set_fn,
                        tokenize_fn) -> dict[str, float]:
    config = resolve_entry("evals", "captioning", config, type="captioning")
    generate = require(predict, "generate", "captioning")
    decode = detokenizer(tokenize_fn, "captioning")
    ds = load_eval_set_fn(config.split, config.max_examples)
    start = time.perf_counter()
    tokens = map_in_batches(generate, [ds.images], config.batch_size)
    seconds = time.perf_counter() - start
    captions = decode(tokens)
    for i in range(min(config.log_examples, len(captions))):
        _log.info("caption %d: %r (reference %r)", i, captions[i], ds.captions[i][0])
    scores = caption_scores(captions, ds.captions, list(ds.scenes) or None)
    mean_len = float(np.mean([len(normalize_caption(c)) for c in captions]))
    return dict(scores, mean_length=mean_len, seconds=seconds)


def evaluate_likelihood_zero_shot(config: Mapping[str, Any], predict: PredictFns,
                                  load_eval_set_fn, tokenize_fn) -> dict[str, float]:
    """Zero-shot classification by likelihood (generative models): each image is assigned
    the class whose prompt (`EvalSet.prompt_templates[template]` with the class name) has
    the highest mean token log-likelihood under `score_pairs`. -> top1, top5, chance (%)."""
    config = resolve_entry("evals", "likelihood_zero_shot", config,
                           type="likelihood_zero_shot")
    score = require(predict, "score_pairs", "likelihood_zero_shot")
    ds = load_eval_set_fn(config.split, config.max_examples)
    template = ds.prompt_templates[config.template]
    prompts = np.asarray(tokenize_fn([template.format(c) for c in ds.class_names]))
    n = len(ds)
    scores = np.stack([map_in_batches(score, [ds.images, np.repeat(p[None], n, axis=0)],
                                      config.batch_size) for p in prompts], axis=1)   # [N, C]
    order = np.argsort(-scores, axis=1)
    labels = np.asarray(ds.labels)[:, None]
    return dict(top1=100.0 * float(np.mean(order[:, :1] == labels)),
                top5=100.0 * float(np.mean(np.any(order[:, :5] == labels, axis=1))),
                chance=100.0 / len(ds.class_names))
