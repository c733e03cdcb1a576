"""The evaluator protocol: what an evaluator receives and returns.

An evaluator is a function

    evaluate_<family>(config, predict, load_eval_set_fn, tokenize_fn) -> {metric: float}

  config: its entry of `config.evals` (`type`, `split`, `max_examples`, `batch_size`,
    `log_steps`, and keys of its own);
  predict: `PredictFns`, a mapping from names to prediction functions *bound to the current
    parameters* (jitted once by the trainer with the parameters as an argument and mesh
    shardings; binding is free). Names in use:
      encode_image(images float32 [B, H, W, 3]) -> unit-norm embeddings [B, D]
      encode_text(tokens int32 [B, L])          -> unit-norm embeddings [B, D]
      score_pairs(images [B, H, W, 3], tokens [B, L]) -> match scores [B] (fusion models)
    with room for more (`generate`, `answer`). Each call should see one batch shape
    (`embed.map_in_batches` pads the last batch) so a jitted function compiles once;
    the batch should divide evenly over the mesh's data axes;
  load_eval_set_fn: (split, max_examples) -> `vlp_jax.data.types.EvalSet`;
  tokenize_fn: list[str] -> int32 [N, L]; the trainer passes a `TextCodec`, whose
    `decode(ids int [N, L]) -> list[str]` turns generated tokens back into text
    (`detokenizer` fetches it with a clear error where it is missing).

It returns unprefixed metric names (`run_evaluators` adds '<evaluator name>/'). Evaluators
import no methods and no models: they see only these functions.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vlp_jax.data.types import EvalSet

PredictFns = Mapping[str, Callable[..., Any]]
LoadEvalSetFn = Callable[[str, "int | None"], EvalSet]
TokenizeFn = Callable[[Sequence[str]], np.ndarray]
EvaluatorFn = Callable[[Mapping[str, Any], PredictFns, LoadEvalSetFn, TokenizeFn], dict]


def require(predict: PredictFns, name: str, evaluator: str) -> Callable[..., Any]:
    """predict[name], or a ValueError naming the evaluator and the functions available."""
    fn = predict.get(name) if hasattr(predict, "get") else None
    if fn is None:
        raise ValueError(f"evaluator type {evaluator!r} needs the prediction function {name!r}; "
                         f"this method provides {sorted(predict)}"
                         + (" (score_pairs: a fusion model with an ITM head)"
                            if name == "score_pairs" else ""))
    return fn


def without(predict: PredictFns, *names: str) -> dict[str, Callable[..., Any]]:
    """A copy of `predict` without `names` (e.g. scoring by ITC although an ITM head exists)."""
    return {k: v for k, v in predict.items() if k not in names}


class TextCodec:
    """A tokenize_fn that can also decode: codec(texts) -> int32 [N, L] (encode) and
    codec.decode(ids int [N, L]) -> list[str] (stops at eos, skips pad / bos)."""

    def __init__(self, encode: TokenizeFn, decode: Callable[[np.ndarray], list]):
        self._encode, self._decode = encode, decode

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

    def decode(self, ids: np.ndarray) -> list[str]:
        return list(self._decode(np.asarray(ids)))


def detokenizer(tokenize_fn: TokenizeFn, evaluator: str) -> Callable[[np.ndarray], list]:
    """tokenize_fn.decode, or a ValueError naming the evaluator that needs it."""
    decode = getattr(tokenize_fn, "decode", None)
    if decode is None:
        raise ValueError(f"evaluator type {evaluator!r} turns generated tokens into text: pass "
                         "a tokenize_fn with a `decode` (evaluators.protocol.TextCodec)")
    return decode
