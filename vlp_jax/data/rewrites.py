"""A pluggable source of caption rewrites for LaCLIP-style text augmentation.

LaCLIP (Fan et al. 2023) rewrites every caption a few times with a language model and trains on a
random one each step. Here rewrites come from a JSON-lines file, one object per line, keyed either
by the caption text or by the training example's index:

    {"caption": "a red circle above a blue square", "rewrites": ["a blue square below a red one"]}
    {"index": 17, "rewrites": ["two shapes, the red one on top"]}

Caption keys are matched after lower-casing and collapsing whitespace. For one example,
`RewriteTable.candidates(captions, index)` returns its own captions followed by the rewrites of
any of them and of its index, without duplicates; `candidate_tokens` tokenizes them into the fixed
[K, L] block the pipeline ships as the all-captions key (absent candidates are all-pad rows, which
`vlp_jax.methods.laclip.sample_captions` never draws).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np


def normalize_caption(text: str) -> str:
    return " ".join(text.lower().split())


@dataclasses.dataclass(frozen=True)
class RewriteTable:
    """Rewrites by normalised caption and by example index."""

    by_caption: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    by_index: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return sum(map(len, self.by_caption.values())) + sum(map(len, self.by_index.values()))

    def rewrites(self, captions: Sequence[str], index: int | None = None) -> list[str]:
        out = []
        for caption in captions:
            out.extend(self.by_caption.get(normalize_caption(caption), ()))
        if index is not None:
            out.extend(self.by_index.get(int(index), ()))
        return out

    def candidates(self, captions: Sequence[str], index: int | None = None,
                   max_candidates: int | None = None) -> list[str]:
        """The example's captions, then its rewrites; duplicates (after normalisation) dropped;
        at most `max_candidates` (originals first)."""
        seen, out = set(), []
        for text in list(captions) + self.rewrites(captions, index):
            key = normalize_caption(text)
            if key and key not in seen:
                seen.add(key)
                out.append(text)
        return out if max_candidates is None else out[:max_candidates]


def parse_rewrites(lines: Iterable[str], source: str = "<rewrites>") -> RewriteTable:
    """Builds a table from JSON lines (blank lines skipped); ValueError names the bad line."""
    by_caption: dict[str, list[str]] = {}
    by_index: dict[int, list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        keys = [k for k in ("caption", "index") if k in row]
        if len(keys) != 1:
            raise ValueError(f"{where}: give exactly one of 'caption' or 'index', "
                             f"got {sorted(row)}")
        rewrites = row.get("rewrites")
        if not isinstance(rewrites, list) or not all(isinstance(r, str) for r in rewrites):
            raise ValueError(f"{where}: 'rewrites' must be a list of strings")
        if keys[0] == "caption":
            if not isinstance(row["caption"], str):
                raise ValueError(f"{where}: 'caption' must be a string")
            by_caption.setdefault(normalize_caption(row["caption"]), []).extend(rewrites)
        else:
            if not isinstance(row["index"], int) or isinstance(row["index"], bool):
                raise ValueError(f"{where}: 'index' must be an integer")
            by_index.setdefault(row["index"], []).extend(rewrites)
    return RewriteTable({k: tuple(v) for k, v in by_caption.items()},
                        {k: tuple(v) for k, v in by_index.items()})


def load_rewrites(path: str) -> RewriteTable:
    """Reads a JSON-lines rewrite file (see the module docstring)."""
    with open(path, encoding="utf-8") as f:
        return parse_rewrites(f, source=path)


def write_rewrites(path: str, rows: Iterable[Mapping]) -> None:
    """Writes rows ({'caption' or 'index', 'rewrites'}) as JSON lines, e.g. from an LLM job."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")


def candidate_tokens(texts: Sequence[str], tokenize: Callable[[list[str]], np.ndarray],
                     num_candidates: int, length: int) -> np.ndarray:
    """Tokenizes up to `num_candidates` texts into int32 [num_candidates, length]; missing rows
    are all zeros (pad)."""
    out = np.zeros((num_candidates, length), np.int32)
    texts = list(texts)[:num_candidates]
    if texts:
        tokens = np.asarray(tokenize(texts), np.int32)
        if tokens.shape != (len(texts), length):
            raise ValueError(f"tokenize returned shape {tokens.shape}, expected "
                             f"{(len(texts), length)}")
        out[:len(texts)] = tokens
    return out
