"""Evaluators: zero-shot classification, image-text retrieval, and the `type` registry.

The trainer calls `run_evaluators(config.evals, predict, data.load_eval_set, data.tokenize)`
with `predict` the method's named prediction functions bound to the current parameters; the
protocol is `protocol.py`, the config and adding types `registry.py`.
"""
from vlp_jax.evaluators.embed import embed_in_batches, map_in_batches
from vlp_jax.evaluators.protocol import EvaluatorFn, PredictFns, require
from vlp_jax.evaluators.registry import (EVALUATORS, evaluate_retrieval, evaluate_zero_shot,
                                         register_evaluator, run_evaluators)
from vlp_jax.evaluators.retrieval import l2_normalize, recall_from_scores, retrieval_metrics
from vlp_jax.evaluators.zero_shot import class_embeddings, fill_templates, zero_shot_accuracy

__all__ = [
    "EVALUATORS", "EvaluatorFn", "PredictFns", "class_embeddings", "embed_in_batches", "evaluate_retrieval",
    "evaluate_zero_shot", "fill_templates", "l2_normalize", "map_in_batches",
    "recall_from_scores", "register_evaluator", "require", "retrieval_metrics", "run_evaluators",
    "zero_shot_accuracy",
]
