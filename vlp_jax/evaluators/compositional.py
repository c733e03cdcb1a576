"""Compositional evaluation (ARO / Winoground style) with the shapes world's hard negatives.

For each image, its true caption competes with captions of the same scene in which
attributes or relations were swapped ("a red circle left of a blue square" vs "a blue circle
left of a red square" / "... right of ..."). A model that reads the caption as a bag of
words cannot separate them. For image i, true caption c_i and negative n_ik of kind k:

    correct_ik = 1[s(i, c_i) > s(i, n_ik)] + 1/2 * 1[s(i, c_i) = s(i, n_ik)]

(ties count one half: the expected accuracy of breaking them at random, so a scorer blind
to the swap sits at chance, 50%). Reported, in percent: accuracy per kind of swap
(`compositional/<kind>`), over all pairs (`compositional/overall`), the share of images
whose true caption beats every negative (`compositional/all_negatives`), the counts
(`compositional/n_<kind>`) and `compositional/chance` = 50.

Scores s: the cosine of the ITC embeddings by default; the `score_pairs` match score (an
ITM head) when the model provides one.

config (an entry of `config.evals` with type 'compositional'):
  split: eval split; max_examples: cap on images (None = all);
  batch_size: encoder batch; seed: for negatives that are drawn at random;
  tie_tolerance: |score difference| below which two scores count as a tie (1e-5).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from vlp_jax.config_schema import resolve_entry
from vlp_jax.evaluators.protocol import PredictFns, require, without

CHANCE = 50.0


def _batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn over rows of `arrays` in fixed-size batches (the last one padded), concatenated."""
    n = arrays[0].shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        size = chunk[0].shape[0]
        if size < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - size, axis=0)])
                     for c in chunk]
        out.append(np.asarray(fn(*chunk))[:size])
    return np.concatenate(out) if out else np.zeros((0,))


def caption_scores(predict: PredictFns, images: np.ndarray, tokens: np.ndarray,
                   owner: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Score of each caption against its own image: tokens [M, L], owner int [M] -> [M].

    ITC cosine <u_owner, v_m> unless `predict` has `score_pairs` (fusion models).
    """
    if predict.get("score_pairs") is not None:
        return _batched(predict["score_pairs"], (images[owner], tokens), batch_size)
    u = _batched(require(predict, "encode_image", "compositional"), (images,), batch_size)
    v = _batched(require(predict, "encode_text", "compositional"), (tokens,), batch_size)
    return np.sum(u[owner].astype(np.float64) * v.astype(np.float64), axis=-1)


def pairwise_accuracy(positive: np.ndarray, negative: np.ndarray, kinds: Sequence[str],
                      image_of_negative: np.ndarray, tie_tolerance: float = 1e-5
                      ) -> dict[str, float]:
    """Accuracy per kind from positive scores [N] and negative scores [K_total].

    negative[j] belongs to image `image_of_negative[j]` and is of kind `kinds[j]`.
    """
    diff = positive[image_of_negative] - negative
    win = np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(np.float64))
    by_kind = defaultdict(list)
    for w, kind in zip(win, kinds):
        by_kind[kind].append(w)
    out = {}
    for kind in sorted(by_kind):
        out[kind] = 100.0 * float(np.mean(by_kind[kind]))
        out[f"n_{kind}"] = float(len(by_kind[kind]))
    out["overall"] = 100.0 * float(np.mean(win)) if len(win) else float("nan")
    images = np.unique(image_of_negative)
    beaten = [np.all(win[image_of_negative == i] == 1.0) for i in images]
    out["all_negatives"] = 100.0 * float(np.mean(beaten)) if len(images) else float("nan")
    out["chance"] = CHANCE
    return out


def evaluate_compositional(predict: PredictFns, images: np.ndarray, positives: Sequence[str],
                           negatives: Sequence[Sequence[tuple[str, str]]],
                           tokenize: Callable[[Sequence[str]], np.ndarray],
                           batch_size: int = 256, tie_tolerance: float = 1e-5
                           ) -> dict[str, float]:
    """Core of the evaluator: images [N, ...], one true caption per image, and for image i
    a list of (negative caption, kind). Images without negatives are skipped."""
    keep = [i for i, negs in enumerate(negatives) if len(negs)]
    if not keep:
        raise ValueError("compositional evaluation found no hard negatives in the eval set")
    images = np.asarray(images)[keep]
    texts = [positives[i] for i in keep]
    owner = list(range(len(keep)))
    kinds = []
    for row, i in enumerate(keep):
        for caption, kind in negatives[i]:
            texts.append(caption)
            owner.append(row)
            kinds.append(kind)
    scores = caption_scores(predict, images, np.asarray(tokenize(texts)),
                            np.asarray(owner, np.int32), batch_size)
    n = len(keep)
    return pairwise_accuracy(scores[:n], scores[n:], kinds, np.asarray(owner[n:]),
                             tie_tolerance)


def evaluate_compositional_config(config, predict: PredictFns, load_eval_set_fn,
                                  tokenize_fn) -> dict[str, float]:
    """The 'compositional' evaluator of `config.evals`: each image of the split scored with
    its scene's canonical caption against that caption's swaps (`shapes_world.hard_negatives`).
    `config.use_itm` (default True) scores with the ITM head when the model has one; False
    compares ITC cosines, so a fusion model's two stages can be measured separately."""
    from vlp_jax.data import shapes_world
    config = resolve_entry("evals", "compositional", config, type="compositional")
    ds = load_eval_set_fn(config.split, config.max_examples)
    if not ds.scenes:
        raise ValueError("the compositional evaluator needs the eval set's scene descriptions")
    if not config.use_itm:
        predict = without(predict, "score_pairs")
    positives = [shapes_world.canonical_caption(s) for s in ds.scenes]
    negatives = [shapes_world.hard_negatives(s) for s in ds.scenes]
    return evaluate_compositional(predict, ds.images, positives, negatives, tokenize_fn,
                                  batch_size=config.batch_size,
                                  tie_tolerance=float(config.tie_tolerance))
