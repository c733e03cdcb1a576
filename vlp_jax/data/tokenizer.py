"""A sentencepiece tokenizer with fixed special ids, trained in memory on the captions.

Ids: pad = 0, bos = 1, eos = 2, unk = 3, `[MASK]` = 4 (for masked language modelling), then
the learned pieces. Text is case-folded (NFKC + lower case) before tokenization, so decoding
returns lower-case text. Encoded rows are laid out `bos tok ... tok eos pad ... pad`.

`Tokenizer.word_start` is the per-id table whole-word masking needs (bool [vocab_size]): a
piece starts a word when it carries sentencepiece's word-boundary prefix '\u2581'; pad, bos,
eos and [MASK] count as word starts (they never glue onto the preceding word), unk as a
continuation (an unseen character inside a word). Punctuation is whatever sentencepiece made
of it: '.' is learned as a continuation piece, so "left." is one word ('\u2581left' + '.').
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MASK_TOKEN = "[MASK]"
WORD_BOUNDARY = "\u2581"     # sentencepiece's whitespace marker, prefixed to word-initial pieces


def train_tokenizer(sentences: Iterable[str], vocab_size: int = 256) -> bytes:
    """Trains a BPE sentencepiece model in memory; returns the serialized model.

    BPE, not unigram: on a small, repetitive corpus sentencepiece's unigram trainer seeds only
    ~80 pieces and splits most words into characters; BPE merges every frequent word whole.
    `vocab_size` is an upper bound (`hard_vocab_limit=False`): a small corpus may yield fewer
    pieces. Training is single-threaded so the same sentences give the same bytes.
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise ValueError("train_tokenizer needs at least one non-empty sentence")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="bpe", character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf", pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, user_defined_symbols=[MASK_TOKEN], num_threads=1, minloglevel=2)
    return buf.getvalue()


def word_start_table(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """bool [V]: piece i starts a word iff it begins with '\u2581' or is a control piece
    (pad, bos, eos) or [MASK], which stand alone. unk is a continuation: sentencepiece emits
    it for a character it never saw, inside a word whose start ('\u2581...' or a lone '\u2581')
    precedes it."""
    table = np.zeros(sp.get_piece_size(), bool)
    for i in range(sp.get_piece_size()):
        special = sp.is_control(i) or sp.id_to_piece(i) == MASK_TOKEN
        table[i] = special or sp.id_to_piece(i).startswith(WORD_BOUNDARY)
    return table


class Tokenizer:
    """Wraps a sentencepiece model (bytes or a path); picklable (it ships the model bytes)."""

    def __init__(self, model: bytes | str | os.PathLike):
        if isinstance(model, (str, os.PathLike)):
            with open(model, "rb") as f:
                model = f.read()
        self._model = bytes(model)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model)
        expected = dict(pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID)
        actual = dict(pad_id=self._sp.pad_id(), bos_id=self._sp.bos_id(),
                      eos_id=self._sp.eos_id(), unk_id=self._sp.unk_id())
        if actual != expected:
            raise ValueError(f"sentencepiece model has special ids {actual}, expected {expected}"
                             " (train it with train_tokenizer)")
        self._mask_id = self._sp.piece_to_id(MASK_TOKEN)
        if self._mask_id == self._sp.unk_id():
            raise ValueError(f"sentencepiece model has no {MASK_TOKEN} piece")
        self._word_start = word_start_table(self._sp)
        self._memo: dict[str, list[int]] = {}

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(path)

    @property
    def model_bytes(self) -> bytes:
        return self._model

    def __getstate__(self):
        return {"model": self._model}

    def __setstate__(self, state):
        self.__init__(state["model"])

    pad_id = property(lambda self: PAD_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    unk_id = property(lambda self: UNK_ID)
    mask_id = property(lambda self: self._mask_id)
    vocab_size = property(lambda self: self._sp.get_piece_size())

    @property
    def word_start(self) -> np.ndarray:
        """bool [vocab_size]: True where piece id i begins a word (a copy; see module doc)."""
        return self._word_start.copy()

    def pieces(self, text: str) -> list[str]:
        """The sentencepiece pieces of one text (no bos/eos)."""
        return self._sp.encode(text, out_type=str)

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int32 [N, length]: `bos tokens... eos pad...`; long texts lose their tail tokens
        so that eos is always present."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, got one str")
        if length < 2:
            raise ValueError(f"length must be >= 2 (room for bos and eos), got {length}")
        out = np.full((len(texts), length), PAD_ID, np.int32)
        for row, text in zip(out, texts):     # one by one: a list call costs ~60 us more
            ids = [BOS_ID] + self._ids(text)[:length - 2] + [EOS_ID]
            row[:len(ids)] = ids
        return out

    def token_count(self, text: str) -> int:
        """Tokens `text` needs including bos and eos (the length that avoids truncation)."""
        return len(self._ids(text)) + 2

    _MEMO_SIZE = 1 << 16

    def _ids(self, text: str) -> list[int]:
        """The sentencepiece ids of `text` (no bos/eos; do not modify), memoised: the input
        pipeline encodes the same short texts again and again (a caption, then its overflow
        check; prompts and answers that recur across examples). The memo is emptied when it
        reaches _MEMO_SIZE texts and is not pickled (workers start with their own)."""
        ids = self._memo.get(text)
        if ids is None:
            if len(self._memo) >= self._MEMO_SIZE:
                self._memo.clear()
            ids = self._memo[text] = self._sp.encode(text)
        return ids

    def decode(self, ids) -> str | list[str]:
        """Text of int [L] (a str) or [N, L] (a list); stops at eos, skips pad/bos."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"decode takes ids of shape [L] or [N, L], got {ids.shape}")
        kept = []
        for i in ids.tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)
