"""Masked language modelling (BERT, Devlin et al. 2019) as used by ViLT, ALBEF and UNITER.

Masking chooses a fraction `prob` of the ordinary (non-special) tokens; a chosen token becomes
[MASK] with probability 0.8, a random ordinary token with 0.1 and stays itself with 0.1, and
the model predicts the original token at every chosen position:

    L_MLM = - sum_t w_t log p(x_t | x_masked) / sum_t w_t,     w_t = 1 if t was chosen.

ViLT masks whole words: all word pieces of a chosen word are chosen together. ALBEF adds
momentum distillation, a soft cross-entropy against the momentum model's distribution.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

MASK_FRACTION = 0.8     # of the chosen tokens: -> [MASK]
RANDOM_FRACTION = 0.1   # -> a random ordinary token; the remaining 0.1 stay unchanged


def _ordinary(tokens: jax.Array, special_ids: Sequence[int]) -> jax.Array:
    """bool [B, L]: tokens whose id is not special."""
    ok = jnp.ones(tokens.shape, bool)
    for sid in special_ids:
        ok &= tokens != sid
    return ok


def random_ordinary_ids(rng: jax.Array, shape: Sequence[int], vocab_size: int,
                        special_ids: Sequence[int]) -> jax.Array:
    """Uniform draws from the ids in [0, vocab_size) that are not special. int32 `shape`.

    Draws r in [0, V - S) and maps it to the r-th non-special id: walking the special ids in
    ascending order, every special id <= r shifts r up by one.
    """
    specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    if vocab_size - len(specials) < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token besides the "
                         f"special ids {specials}")
    r = jax.random.randint(rng, tuple(shape), 0, vocab_size - len(specials), dtype=jnp.int32)
    for s in specials:
        r = r + (r >= s).astype(jnp.int32)
    return r


def _word_ids(maskable: jax.Array, word_start: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-token word index within its row, int32 [B, L], and a bool [B, L] of word starts.

    A word starts at a maskable token flagged as a word start, or at a maskable token that
    follows a non-maskable one (a piece right after BOS/CLS opens a word). Without
    `word_start` every maskable token is its own word. Non-maskable tokens keep the index of
    the preceding word but are never chosen.
    """
    if word_start is None:
        starts = maskable
    else:
        prev = jnp.pad(maskable[:, :-1], ((0, 0), (1, 0)), constant_values=False)
        starts = maskable & (word_start | ~prev)
    ids = jnp.maximum(jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1, 0)
    return ids, starts


def choose_positions(rng: jax.Array, maskable: jax.Array, prob: float,
                     word_start: jax.Array | None = None) -> jax.Array:
    """bool [B, L]: each word (or token) chosen with probability `prob`, at least one word in
    every row that has a maskable token (if none was chosen, one maskable token is picked
    uniformly and its whole word is chosen)."""
    b, l = maskable.shape
    k_word, k_fallback = jax.random.split(rng)
    word, _ = _word_ids(maskable, word_start)
    word_drawn = jax.random.uniform(k_word, (b, l)) < prob                   # per word index
    chosen = maskable & jnp.take_along_axis(word_drawn, word, axis=1)
    noise = jnp.where(maskable, jax.random.uniform(k_fallback, (b, l)), -1.0)
    pick = jnp.argmax(noise, axis=1)                                          # [B]
    fallback = maskable & (word == jnp.take_along_axis(word, pick[:, None], axis=1))
    none = ~jnp.any(chosen, axis=1, keepdims=True)
    return jnp.where(none, fallback, chosen)


def mask_tokens(rng: jax.Array, tokens: jax.Array, *, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], prob: float = 0.15,
                word_start: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT masking with 80/10/10 corruption, optionally of whole words (ViLT).

    Args:
      rng: PRNG key.
      tokens: int [B, L] token ids.
      mask_id: the [MASK] id; vocab_size: V (random replacements are drawn from [0, V)
        minus `special_ids`).
      special_ids: ids never chosen nor drawn as replacements (pad, bos/cls, eos/sep, mask).
      prob: fraction of ordinary tokens (or words) chosen, in (0, 1).
      word_start: optional whole-word masking. Either bool [B, L] (True where a token begins
        a word) or a per-id table bool [V] (looked up as word_start[tokens], e.g. the
        sentencepiece pieces starting with '\u2581'). A word is a start token plus the
        following non-start tokens; all its pieces are chosen together.
    Returns:
      (inputs int [B, L] corrupted tokens, targets int [B, L] = tokens,
       weights float32 [B, L] = 1 at chosen positions else 0).
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"MLM mask probability (mlm_prob) must be in (0, 1), got {prob}")
    if tokens.ndim != 2:
        raise ValueError(f"mask_tokens expects tokens [B, L], got shape {tokens.shape}")
    if word_start is not None:
        word_start = jnp.asarray(word_start, bool)
        if word_start.ndim == 1:
            word_start = word_start[tokens]
        if word_start.shape != tokens.shape:
            raise ValueError(f"word_start must be [B, L] {tokens.shape} or a [V] table, got "
                             f"{word_start.shape}")
    k_choose, k_kind, k_rand = jax.random.split(rng, 3)
    maskable = _ordinary(tokens, special_ids)
    chosen = choose_positions(k_choose, maskable, prob, word_start)
    u = jax.random.uniform(k_kind, tokens.shape)
    random_ids = random_ordinary_ids(k_rand, tokens.shape, vocab_size, special_ids)
    inputs = jnp.where(chosen & (u < MASK_FRACTION), mask_id, tokens)
    inputs = jnp.where(chosen & (u >= MASK_FRACTION) & (u < MASK_FRACTION + RANDOM_FRACTION),
                       random_ids, inputs)
    return inputs.astype(tokens.dtype), tokens, chosen.astype(jnp.float32)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy over the chosen positions.

    L = sum_t w_t CE(z_t, y_t) / max(sum_t w_t, eps)   (0 when nothing is chosen).
    logits [B, L, V], targets int [B, L], weights [B, L]. Returns (loss [],
    dict(mlm_acc = weighted top-1 accuracy)).
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32))
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return _weighted_mean(ce, weights), dict(mlm_acc=_weighted_mean(hits, weights))


def soft_mlm_loss(logits: jax.Array, teacher_probs: jax.Array, weights: jax.Array
                  ) -> jax.Array:
    """ALBEF's MLM distillation term: soft cross-entropy against the momentum model.

    L = - sum_t w_t sum_v q_tv log softmax(z_t)_v / sum_t w_t, with q the teacher's
    distribution [B, L, V] (treated as a constant). logits [B, L, V], weights [B, L].
    Returns loss [].
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    q = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    return _weighted_mean(-jnp.sum(q * log_p, axis=-1), weights)
