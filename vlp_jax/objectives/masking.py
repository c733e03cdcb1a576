"""Input corruption drawn in `prepare_batch` (before differentiation): BERT masking of the
caption for MLM objectives (ViLT / UNITER, ALBEF).

`MlmMasking` adds batch['mlm_inputs'] (the corrupted tokens), batch['mlm_targets'] and
batch['mlm_weights'] [B, L] (`losses.mlm.mask_tokens`: `prob` of the maskable tokens chosen,
80% [MASK] / 10% random / 10% kept; whole words when `whole_word` and the tokenizer's
`word_start` table is in the vocab).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vlp_jax.losses.mlm import mask_tokens

MLM_KEYS = ("mlm_inputs", "mlm_targets", "mlm_weights")


def mlm_special_ids(vocab: dict) -> tuple[int, ...]:
    """Token ids that are never masked: pad, bos, eos (and the mask id itself)."""
    return tuple(int(vocab[k]) for k in ("pad_id", "bos_id", "eos_id", "mask_id") if k in vocab)


def mask_for_mlm(rng, tokens, vocab: dict, prob: float, whole_word: bool):
    """(inputs, targets, weights) of BERT masking with the tokenizer's ids, each [B, L]."""
    missing = [k for k in ("mask_id", "vocab_size", "pad_id") if k not in vocab]
    if missing:
        raise ValueError(f"MLM needs the tokenizer ids {missing} in the method's vocab")
    word_start = vocab.get("word_start") if whole_word else None
    if whole_word and word_start is None:
        raise ValueError("method.whole_word_masking=True needs the tokenizer's word_start table "
                         "(vocab['word_start'], bool [vocab_size]) in the method's vocab")
    if word_start is not None:
        word_start = jnp.asarray(word_start, bool)
    return mask_tokens(rng, tokens, mask_id=int(vocab["mask_id"]),
                       vocab_size=int(vocab["vocab_size"]), special_ids=mlm_special_ids(vocab),
                       prob=prob, word_start=word_start)


@dataclasses.dataclass(frozen=True)
class MlmMasking:
    """prepare_batch step: batch + mlm_inputs / mlm_targets / mlm_weights of batch['text']."""

    vocab: dict = dataclasses.field(hash=False, compare=False)
    prob: float = 0.15
    whole_word: bool = False

    def __post_init__(self):
        if not 0.0 < self.prob < 1.0:
            raise ValueError(f"method.mlm_prob must be in (0, 1), got {self.prob}")

    def __call__(self, batch: dict, rng: jax.Array) -> dict:
        inputs, targets, weights = mask_for_mlm(rng, batch["text"], self.vocab, self.prob,
                                                self.whole_word)
        return dict(batch, mlm_inputs=inputs, mlm_targets=targets, mlm_weights=weights)


def require_prepared(batch: dict, keys=MLM_KEYS, who: str = "this method") -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{who}'s loss takes a prepared batch (method.prepare_batch adds "
                         f"{list(keys)}); missing {missing}")
