"""Evaluators chosen by `type` (big_vision style) and the loop that runs `config.evals`.

`config.evals` maps an evaluator name to its config:

    config.evals = ml_collections.ConfigDict(dict(
        zeroshot=dict(type="zero_shot", split="test", max_examples=None, batch_size=256),
        retrieval=dict(type="retrieval", split="test", max_examples=None, batch_size=256),
    ))

Keys common to all types: `type` (required), `split` (required), `max_examples` (None = the
whole split), `batch_size` (encoder batch, default 256; on a mesh it should divide evenly
over the data axis), `log_steps`. Each type's keys and defaults are declared in
`vlp_jax/evaluators/fields.py`; an unknown key fails naming the nearest valid one.

Metrics come back flat as `<evaluator name>/<metric>`, e.g. `zeroshot/top1`,
`retrieval/i2t_r1`, all Python floats in percent.

Adding a family (compositional, ITM re-ranking retrieval, VQA, ...): write, in its own module,

    def evaluate_<family>(config, predict, load_eval_set_fn, tokenize_fn) -> dict[str, float]

(the protocol, `predict` included, is `vlp_jax.evaluators.protocol`) returning unprefixed
metric names, add ONE entry `"<type>": evaluate_<family>` to `EVALUATORS` below and declare
its keys in fields.py (or call `register_evaluator("<type>", fn, key=Field(...), ...)` from
outside the package). Nothing else changes: `run_evaluators` dispatches on `type` and adds the
prefix; the evaluator reads its filled-in keys from `entry(config, "<type>")`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vlp_jax.config_schema import declare, resolve_entry, resolve_part
from vlp_jax.data.types import EvalSet
from vlp_jax.evaluators.captioning import evaluate_captioning, evaluate_likelihood_zero_shot
from vlp_jax.evaluators.compositional import evaluate_compositional_config
from vlp_jax.evaluators.embed import embed_in_batches
from vlp_jax.evaluators.itm_rerank import evaluate_itm_rerank
from vlp_jax.evaluators.protocol import (EvaluatorFn, LoadEvalSetFn, PredictFns, TokenizeFn,
                                         require)
from vlp_jax.evaluators.retrieval import retrieval_metrics
from vlp_jax.evaluators.text_tasks import evaluate_text_tasks
from vlp_jax.evaluators.zero_shot import class_embeddings, zero_shot_accuracy

_log = logging.getLogger(__name__)


def entry(config: Mapping[str, Any], type_name: str) -> Any:
    """An evaluator's config checked against its declaration (vlp_jax/evaluators/fields.py)
    with the declared defaults filled in, so evaluators read `config.batch_size` etc. (the
    trainer's configs are resolved already; direct callers may pass a partial dict)."""
    return resolve_entry("evals", type_name, config, type=type_name)


def _load(config, load_eval_set_fn: LoadEvalSetFn) -> EvalSet:
    return load_eval_set_fn(config.split, config.max_examples)


def evaluate_zero_shot(config: Mapping[str, Any], predict: PredictFns,
                       load_eval_set_fn: LoadEvalSetFn, tokenize_fn: TokenizeFn
                       ) -> dict[str, float]:
    """Zero-shot classification of the split's images into `EvalSet.class_names` using
    `EvalSet.prompt_templates` -> {'top1', 'top5', 'chance'} (percent)."""
    config = entry(config, "zero_shot")
    ds = _load(config, load_eval_set_fn)
    bs = config.batch_size
    cls = class_embeddings(require(predict, "encode_text", "zero_shot"), tokenize_fn,
                           ds.class_names, ds.prompt_templates, bs)
    img = embed_in_batches(require(predict, "encode_image", "zero_shot"), ds.images, bs)
    return zero_shot_accuracy(img, cls, np.asarray(ds.labels), ks=tuple(config.ks))


def evaluate_retrieval(config: Mapping[str, Any], predict: PredictFns,
                       load_eval_set_fn: LoadEvalSetFn, tokenize_fn: TokenizeFn
                       ) -> dict[str, float]:
    """COCO-style image<->caption retrieval over all of the split's captions with ITC
    embeddings -> {'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', ...} (percent)."""
    config = entry(config, "retrieval")
    ds = _load(config, load_eval_set_fn)
    bs = config.batch_size
    texts, owner = ds.flat_captions()
    img = embed_in_batches(require(predict, "encode_image", "retrieval"), ds.images, bs)
    txt = embed_in_batches(require(predict, "encode_text", "retrieval"),
                           np.asarray(tokenize_fn(texts)), bs)
    return retrieval_metrics(img, txt, owner, ks=tuple(config.ks), chunk_size=config.chunk_size)


EVALUATORS: dict[str, EvaluatorFn] = {
    "zero_shot": evaluate_zero_shot,
    "retrieval": evaluate_retrieval,
    "itm_rerank_retrieval": evaluate_itm_rerank,
    "compositional": evaluate_compositional_config,
    "captioning": evaluate_captioning,
    "likelihood_zero_shot": evaluate_likelihood_zero_shot,
    "text_tasks": evaluate_text_tasks,
}


def register_evaluator(type_name: str, fn: EvaluatorFn, **fields) -> EvaluatorFn:
    """Adds `fn` as the evaluator of `type: type_name` and declares its own config keys
    (`config_schema.Field`s, besides the common ones); refuses to replace an existing one."""
    if type_name in EVALUATORS and EVALUATORS[type_name] is not fn:
        raise ValueError(f"evaluator type {type_name!r} is already registered")
    EVALUATORS[type_name] = fn
    declare("evaluator", type_name, **fields)
    return fn


def run_evaluators(evals_config: Mapping[str, Mapping[str, Any]], predict: PredictFns,
                   load_eval_set_fn: LoadEvalSetFn, tokenize_fn: TokenizeFn
                   ) -> dict[str, float]:
    """Runs every evaluator in `evals_config` and returns their metrics, flat.

    Args:
      evals_config: ConfigDict (or dict) name -> config with `type`, `split`,
        `max_examples`, `batch_size` (see the module docstring).
      predict: `protocol.PredictFns`: {'encode_image': images [B, H, W, 3] -> [B, D],
        'encode_text': tokens int32 [B, L] -> [B, D], ...} (jitted, parameters bound).
      load_eval_set_fn: (split, max_examples) -> EvalSet.
      tokenize_fn: list[str] -> int32 [n, L].

    Returns:
      {'<name>/<metric>': float}. Every `type` is checked before anything runs, so a typo
      fails at once; an unknown one raises ValueError naming the evaluator and valid types.
    """
    for name, cfg in evals_config.items():
        kind = cfg.get("type", None)
        if kind not in EVALUATORS:
            raise ValueError(f"evaluator {name!r} has unknown type {kind!r}; "
                             f"valid types: {sorted(EVALUATORS)}")
    evals_config = resolve_part("evals", evals_config)    # every entry's keys, before running
    metrics: dict[str, float] = {}
    for name, cfg in evals_config.items():
        start = time.perf_counter()
        result = EVALUATORS[cfg["type"]](cfg, predict, load_eval_set_fn, tokenize_fn)
        for key, value in result.items():
            metrics[f"{name}/{key}"] = float(value)
        _log.info("evaluator %s (%s) took %.1fs: %s", name, cfg["type"],
                     time.perf_counter() - start, result)
    return metrics
