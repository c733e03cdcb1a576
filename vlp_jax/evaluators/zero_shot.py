"""Zero-shot classification with prompt ensembling (CLIP, Radford et al. 2021, sec. 3.1.4).

A class is represented by the average of its prompts' text embeddings: every template is
filled with the class name, each prompt embedding is L2-normalised, the T of them are
averaged and the mean is normalised again. An image is assigned the classes whose
embeddings have the largest cosine with its own.

Top-k accuracy is pessimistic about ties like retrieval: the rank of the true class is the
number of OTHER classes whose score is >= the true class's score (NaN scores count as
-inf), and a hit at k is rank < k. With C < k classes top-k is trivially 100.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from vlp_jax.evaluators.embed import embed_in_batches
from vlp_jax.evaluators.retrieval import l2_normalize

DEFAULT_KS = (1, 5)
DEFAULT_CHUNK = 4096


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """C names x T templates -> the C*T prompts, class-major: prompt[c * T + t].

    Each template must contain `{}` (replaced by the class name; other braces are kept).
    """
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name")
    return [t.replace("{}", name) for name in class_names for t in templates]


def class_embeddings(encode_text_fn: Callable[[Any], Any],
                     tokenize_fn: Callable[[Sequence[str]], np.ndarray],
                     class_names: Sequence[str], templates: Sequence[str],
                     batch_size: int) -> np.ndarray:
    """Prompt-ensembled class embeddings.

    Args:
      encode_text_fn: int32 tokens [batch_size, L] -> [batch_size, D] (e.g. jitted).
      tokenize_fn: list of C*T strings -> int32 [C*T, L].
      class_names: C class names.
      templates: T templates, each with one `{}`.
      batch_size: rows per `encode_text_fn` call (the last batch is padded).

    Returns:
      float32 [C, D], unit rows: normalise(mean_t normalise(encode(template_t(class)))).
    """
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    prompts = fill_templates(class_names, templates)
    tokens = np.asarray(tokenize_fn(prompts))
    emb = l2_normalize(embed_in_batches(encode_text_fn, tokens, batch_size))    # [C*T, D]
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)        # [C, D]
    return l2_normalize(emb)


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                       ks: Sequence[int] = DEFAULT_KS,
                       chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Top-k accuracy of nearest-class-embedding classification (cosine).

    Args:
      image_emb: [N, D] image embeddings (normalised here).
      class_emb: [C, D] class embeddings, e.g. from `class_embeddings` (normalised here).
      labels: int [N] true class of each image, in [0, C).
      ks: the k of top-k; logits are formed `chunk_size` images at a time.

    Returns:
      {'top{k}': % for k in ks, 'chance': 100 / C} (percent, 0-100).
    """
    img = l2_normalize(image_emb)
    cls = l2_normalize(class_emb)
    labels = np.asarray(labels)
    if img.ndim != 2 or cls.ndim != 2 or img.shape[1] != cls.shape[1]:
        raise ValueError(f"embeddings must be [N, D] and [C, D], got {img.shape} and {cls.shape}")
    n, c = img.shape[0], cls.shape[0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be int [{n}], got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}) (the number of classes)")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"top-k ks must be >= 1, got {tuple(ks)}")
    ranks = []
    for a in range(0, n, chunk_size):
        logits = img[a:a + chunk_size] @ cls.T                                  # [b, C]
        logits = np.where(np.isnan(logits), -np.inf, logits)
        true = logits[np.arange(logits.shape[0]), labels[a:a + chunk_size]]
        ranks.append((logits >= true[:, None]).sum(axis=1) - 1)
    ranks = np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)
    out = {f"top{k}": 100.0 * float(np.mean(ranks < k)) if n else float("nan") for k in ks}
    out["chance"] = 100.0 / c
    return out
