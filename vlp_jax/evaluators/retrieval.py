"""Image-text retrieval recall@k, scored the way COCO / Flickr30k retrieval is scored.

N images, M captions; caption m belongs to image `text_to_image[m]` (COCO: 5 per image).

  image -> text (i2t): for image i, all M captions are ranked by score; a hit at k when ANY
    of image i's own captions is in the top k. Images with no caption are left out of i2t.
  text -> image (t2i): for caption m, all N images are ranked; a hit at k when its own image
    is in the top k.

Ranks are pessimistic about ties. The rank of the correct answer (0 = first) is the number
of WRONG candidates whose score is >= the correct score:

    i2t: rank_i = #{m : text_to_image[m] != i, s[i, m] >= max_{m' of i} s[i, m']}
    t2i: rank_m = #{i : i != text_to_image[m],  s[i, m] >= s[text_to_image[m], m]}

and a hit at k is rank < k. A tie with a wrong candidate therefore always counts against,
so a collapsed model whose scores are all equal gets (close to) 0, not 100. NaN scores are
treated as -inf, which by the same rule counts a NaN correct score as a miss.

Reported in percent (0-100): `i2t_r{k}` and `t2i_r{k}` for each k in `ks`.

Memory is O(chunk_size * max(N, M)): scores are formed (or, for a given score matrix,
examined) a block of rows at a time and never held whole by `retrieval_metrics`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 1024


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x [n, D] scaled to unit L2 norm (all-zero rows stay zero); float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def _finite_or_neg_inf(s: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(s), -np.inf, s)


def _image_ranks(s: np.ndarray, image_ids: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    """i2t ranks of a block of images: s [c, M] scores of images `image_ids` [c] against all
    captions -> int [c] (M, i.e. never a hit, for an image with no caption)."""
    s = _finite_or_neg_inf(s)
    own = text_to_image[None, :] == image_ids[:, None]                 # [c, M]
    best = np.where(own, s, -np.inf).max(axis=1, initial=-np.inf)      # [c]
    wrong_ge = (s >= best[:, None]) & ~own
    ranks = wrong_ge.sum(axis=1)
    return np.where(own.any(axis=1), ranks, s.shape[1])


def _text_ranks(s: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """t2i ranks of a block of captions: s [c, N] scores of c captions against all images,
    owners int [c] their images -> int [c]."""
    s = _finite_or_neg_inf(s)
    correct = s[np.arange(s.shape[0]), owners]
    return (s >= correct[:, None]).sum(axis=1) - 1     # minus the correct image itself


def _recall(ranks: np.ndarray, ks: Sequence[int], prefix: str) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k)) if ranks.size else float("nan")
    return out


def _check(num_images: int, text_to_image: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    t2i = np.asarray(text_to_image)
    if t2i.ndim != 1 or not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image must be a 1-D integer array, got {t2i.dtype} "
                         f"{t2i.shape}")
    if t2i.size and (t2i.min() < 0 or t2i.max() >= num_images):
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"recall ks must be >= 1, got {tuple(ks)}")
    return t2i.astype(np.int64)


def _metrics(i2t_ranks: list, t2i_ranks: list, has_caption: np.ndarray,
             ks: Sequence[int]) -> dict[str, float]:
    i2t = np.concatenate(i2t_ranks)[has_caption] if i2t_ranks else np.zeros((0,), np.int64)
    t2i = np.concatenate(t2i_ranks) if t2i_ranks else np.zeros((0,), np.int64)
    return {**_recall(i2t, ks, "i2t"), **_recall(t2i, ks, "t2i")}


def recall_from_scores(scores: np.ndarray, text_to_image: np.ndarray,
                       ks: Sequence[int] = DEFAULT_KS,
                       chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Retrieval recall@k from a precomputed similarity matrix.

    For models that score pairs some other way than a dot product (e.g. fusion models that
    re-rank with an ITM head): larger score = better match. Same ranking rule as the module
    docstring; the comparisons are made `chunk_size` rows/columns at a time.

    Args:
      scores: [N, M] score of image i against caption m.
      text_to_image: int [M], the image each caption belongs to.
      ks: the k of recall@k.

    Returns:
      {'i2t_r{k}': %, 't2i_r{k}': %} for k in ks.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N images, M captions], got shape {scores.shape}")
    n, m = scores.shape
    t2i = _check(n, text_to_image, ks)
    if t2i.shape[0] != m:
        raise ValueError(f"scores has {m} caption columns but text_to_image has {t2i.shape[0]}")
    i2t_ranks, t2i_ranks = [], []
    for a in range(0, n, chunk_size):
        block = scores[a:a + chunk_size]                                        # [c, M]
        i2t_ranks.append(_image_ranks(block, np.arange(a, a + block.shape[0]), t2i))
    for a in range(0, m, chunk_size):
        t2i_ranks.append(_text_ranks(scores[:, a:a + chunk_size].T, t2i[a:a + chunk_size]))
    return _metrics(i2t_ranks, t2i_ranks, np.bincount(t2i, minlength=n) > 0, ks)


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS,
                      chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Retrieval recall@k from image and caption embeddings (cosine similarity).

    Both embeddings are L2-normalised here (the encoders are meant to return unit vectors,
    but this is not assumed), so the score is the cosine. Scores are formed `chunk_size`
    rows at a time: image blocks [chunk, M] for i2t and caption blocks [chunk, N] for t2i,
    so memory stays O(chunk_size * max(N, M)).

    Args:
      image_emb: [N, D] image embeddings.
      text_emb: [M, D] caption embeddings.
      text_to_image: int [M], the image each caption belongs to (`EvalSet.flat_captions()`).
      ks: the k of recall@k.

    Returns:
      {'i2t_r{k}': %, 't2i_r{k}': %} for k in ks (percent, 0-100).
    """
    img = l2_normalize(image_emb)
    txt = l2_normalize(text_emb)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings must be [N, D] and [M, D], got {img.shape} and {txt.shape}")
    n, m = img.shape[0], txt.shape[0]
    t2i = _check(n, text_to_image, ks)
    if t2i.shape[0] != m:
        raise ValueError(f"{m} caption embeddings but text_to_image has {t2i.shape[0]} entries")
    i2t_ranks, t2i_ranks = [], []
    for a in range(0, n, chunk_size):
        block = img[a:a + chunk_size] @ txt.T                                   # [c, M]
        i2t_ranks.append(_image_ranks(block, np.arange(a, a + block.shape[0]), t2i))
    for a in range(0, m, chunk_size):
        block = txt[a:a + chunk_size] @ img.T                                   # [c, N]
        t2i_ranks.append(_text_ranks(block, t2i[a:a + chunk_size]))
    return _metrics(i2t_ranks, t2i_ranks, np.bincount(t2i, minlength=n) > 0, ks)
