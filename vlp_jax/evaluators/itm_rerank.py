"""Retrieval by ITC top-k re-ranked with the ITM head (ALBEF / BLIP / VLMo-style evaluation).

A cross-encoder (ViLT, the fusion encoder of ALBEF) must run once per image-caption pair:
scoring all N x M pairs is what took ViLT ~35 hours on COCO 5k. The standard remedy ranks
with the cheap unimodal embeddings first and re-scores only the best k candidates:

  1. s_itc[i, m] = <u_i, v_m> from `encode_image` / `encode_text`;
  2. i2t: for each image i, the k captions with the highest s_itc are re-scored with
     `score_pairs` (ITM logit(match) - logit(no match)); t2i: for each caption, its top-k
     images likewise. Pairs needed by both directions are scored once;
  3. every candidate outside the top k gets -inf, so it ranks below the re-scored ones
     (`add_itc=True` adds s_itc to the ITM score of the re-scored pairs, as ALBEF does);
  4. recall@k from the re-ranked matrices with `retrieval.recall_from_scores` (i2t from the
     i2t matrix, t2i from the t2i matrix).

Metrics (percent unless named otherwise):
  itc_i2t_r{k}, itc_t2i_r{k}      first stage alone
  i2t_r{k}, t2i_r{k}              after re-ranking
  full_i2t_r{k}, full_t2i_r{k}    every pair scored by ITM (only when N*M <= `full_max_pairs`)
  rerank_pairs, total_pairs       pairs scored by the re-ranker, N*M
  itc_seconds, rerank_seconds     measured wall time (compilation excluded)
  itm_acc                         the ITM head as a classifier (ViLT's ITM protocol): every
                                  caption with its own image (match) and with a random other
                                  image (no match), threshold 0; chance 50
  itm_pair_acc                    how often the caption's own image scores above the random
                                  other image (threshold-free; chance 50)
  full_seconds_extrapolated       wall time to score all N*M pairs, EXTRAPOLATED from timing
                                  `timing_pairs` random pairs (measured, `full_seconds`, when
                                  the full scoring was run)
  speedup_extrapolated            full_seconds_extrapolated / (itc_seconds + rerank_seconds)

config keys (besides type/split/max_examples/batch_size): k (16), ks ((1, 5, 10)), add_itc
(False), timing_pairs (4 * batch_size), full_max_pairs (0 = never score all pairs), seed (0).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np

from vlp_jax.config_schema import resolve_entry
from vlp_jax.evaluators.embed import embed_in_batches
from vlp_jax.evaluators.protocol import PredictFns, require
from vlp_jax.evaluators.retrieval import l2_normalize, recall_from_scores

DEFAULT_K = 16


def top_k_pairs(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of both directions: the top-k columns of each row (i2t) and the top-k rows of
    each column (t2i) of scores [N, M]. Returns (i2t_cols int [N, k'], t2i_rows int [M, k''])
    with k' = min(k, M), k'' = min(k, N); ties broken by index."""
    n, m = scores.shape
    kc, kr = min(k, m), min(k, n)
    i2t = np.argsort(-scores, axis=1, kind="stable")[:, :kc]
    t2i = np.argsort(-scores.T, axis=1, kind="stable")[:, :kr]
    return i2t, t2i


def score_pair_list(score_fn: Callable, images: np.ndarray, tokens: np.ndarray,
                    image_idx: np.ndarray, text_idx: np.ndarray, batch_size: int) -> np.ndarray:
    """score_fn over the pairs (images[image_idx[p]], tokens[text_idx[p]]) -> float32 [P].

    Batches are gathered on the fly (never all P images at once) and padded to `batch_size`
    by repeating the last pair, so `score_fn` compiles once; all batches are dispatched
    before any result is read back.
    """
    pending = []
    for a in range(0, len(image_idx), batch_size):
        ii, tt = image_idx[a:a + batch_size], text_idx[a:a + batch_size]
        size = len(ii)
        if size < batch_size:
            ii = np.concatenate([ii, np.repeat(ii[-1:], batch_size - size)])
            tt = np.concatenate([tt, np.repeat(tt[-1:], batch_size - size)])
        pending.append((score_fn(images[ii], tokens[tt]), size))
    if not pending:
        return np.zeros((0,), np.float32)
    return np.concatenate([np.asarray(s, np.float32)[:size] for s, size in pending])


def rerank_matrices(itc: np.ndarray, i2t_cols: np.ndarray, t2i_rows: np.ndarray,
                    pair_scores: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    add_itc: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-ranked score matrices (i2t [N, M], t2i [N, M]) and the number of pairs scored.

    `pair_scores(image_idx [P], text_idx [P]) -> [P]` is called once on the union of both
    directions' candidates; entries outside a direction's candidates are -inf.
    """
    n, m = itc.shape
    rows_a = np.repeat(np.arange(n), i2t_cols.shape[1])
    cols_a = i2t_cols.reshape(-1)
    rows_b = t2i_rows.reshape(-1)
    cols_b = np.repeat(np.arange(m), t2i_rows.shape[1])
    flat = np.unique(np.concatenate([rows_a * m + cols_a, rows_b * m + cols_b]))
    scores = pair_scores(flat // m, flat % m).astype(np.float64)
    if add_itc:
        scores = scores + itc.reshape(-1)[flat]
    i2t = np.full((n, m), -np.inf)
    t2i = np.full((n, m), -np.inf)
    i2t[rows_a, cols_a] = scores[np.searchsorted(flat, rows_a * m + cols_a)]
    t2i[rows_b, cols_b] = scores[np.searchsorted(flat, rows_b * m + cols_b)]
    return i2t, t2i, int(flat.size)


def itm_pair_metrics(pair_scores: Callable, owner: np.ndarray, num_images: int,
                     rng: np.random.Generator) -> dict[str, float]:
    """ITM accuracy on matched vs random mismatched pairs (percent).

    pair_scores(images int [P], captions int [P]) -> float [P] (logit(match) - logit(no
    match)); owner int [M] is each caption's image. Caption m is paired with owner[m] and with
    a uniformly drawn other image owner[m] + U{1..N-1} (mod N).
    """
    if num_images < 2:
        raise ValueError("itm_rerank_retrieval needs at least 2 images")
    m = owner.shape[0]
    other = (owner + rng.integers(1, num_images, size=m)) % num_images
    captions = np.arange(m)
    pos = np.asarray(pair_scores(owner, captions), np.float64)
    neg = np.asarray(pair_scores(other, captions), np.float64)
    return dict(itm_acc=50.0 * (np.mean(pos > 0) + np.mean(neg < 0)),
                itm_pair_acc=100.0 * np.mean(pos > neg))


def _block(x):
    """Waits for a (possibly asynchronous) result so wall times are honest."""
    return np.asarray(x)


def evaluate_itm_rerank(config: Mapping[str, Any], predict: PredictFns, load_eval_set_fn,
                        tokenize_fn) -> dict[str, float]:
    """The 'itm_rerank_retrieval' evaluator (see the module docstring)."""
    score_fn = require(predict, "score_pairs", "itm_rerank_retrieval")
    encode_image = require(predict, "encode_image", "itm_rerank_retrieval")
    encode_text = require(predict, "encode_text", "itm_rerank_retrieval")
    config = resolve_entry("evals", "itm_rerank_retrieval", config, type="itm_rerank_retrieval")
    ds = load_eval_set_fn(config.split, config.max_examples)
    bs, k, ks = config.batch_size, config.k, tuple(config.ks)
    if k < 1:
        raise ValueError(f"itm_rerank_retrieval: k must be >= 1, got {k}")
    texts, owner = ds.flat_captions()
    tokens = np.asarray(tokenize_fn(texts))
    images = np.asarray(ds.images)
    n, m = images.shape[0], tokens.shape[0]

    # Compile everything once outside the timed regions.
    _block(encode_image(images[np.zeros(bs, np.int64) % n]))
    _block(encode_text(tokens[np.zeros(bs, np.int64) % m]))
    _block(score_fn(images[np.zeros(bs, np.int64) % n], tokens[np.zeros(bs, np.int64) % m]))

    start = time.perf_counter()
    u = l2_normalize(embed_in_batches(encode_image, images, bs))
    v = l2_normalize(embed_in_batches(encode_text, tokens, bs))
    itc = u.astype(np.float64) @ v.astype(np.float64).T
    i2t_cols, t2i_rows = top_k_pairs(itc, k)
    itc_seconds = time.perf_counter() - start

    start = time.perf_counter()
    pair_scores = lambda ii, tt: score_pair_list(score_fn, images, tokens, ii, tt, bs)
    i2t, t2i, scored = rerank_matrices(itc, i2t_cols, t2i_rows, pair_scores,
                                       config.add_itc)
    rerank_seconds = time.perf_counter() - start

    out = {f"itc_{key}": val for key, val in recall_from_scores(itc, owner, ks).items()}
    out.update({key: val for key, val in recall_from_scores(i2t, owner, ks).items()
                if key.startswith("i2t")})
    out.update({key: val for key, val in recall_from_scores(t2i, owner, ks).items()
                if key.startswith("t2i")})

    rng = np.random.default_rng(config.seed)
    out.update(itm_pair_metrics(pair_scores, owner, n, rng))
    count = min(n * m, config.timing_pairs or 4 * bs)
    flat = rng.choice(n * m, size=count, replace=False)
    start = time.perf_counter()
    score_pair_list(score_fn, images, tokens, flat // m, flat % m, bs)
    per_pair = (time.perf_counter() - start) / max(count, 1)
    out.update(k=float(k), rerank_pairs=float(scored), total_pairs=float(n * m),
               itc_seconds=itc_seconds, rerank_seconds=rerank_seconds,
               full_seconds_extrapolated=per_pair * n * m,
               speedup_extrapolated=per_pair * n * m / max(itc_seconds + rerank_seconds, 1e-9))
    if n * m <= config.full_max_pairs:
        start = time.perf_counter()
        every = np.arange(n * m)
        full = score_pair_list(score_fn, images, tokens, every // m, every % m, bs)
        out["full_seconds"] = time.perf_counter() - start
        out.update({f"full_{key}": val for key, val in
                    recall_from_scores(full.reshape(n, m), owner, ks).items()})
    return out
