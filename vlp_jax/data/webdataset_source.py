"""Image-text pairs streamed from webdataset tar shards (`data.name='webdataset'`), the layout
img2dataset writes for CC3M / CC12M / LAION.

Shards: `data.train_path` is a brace pattern `/d/{00000..00099}.tar` (`{a..b}` keeps zero
padding, `{x,y}` lists alternatives), a comma-separated list of such patterns or one path
(`expand_shards`). A shard holds members `KEY.EXT` in tar order; consecutive members of one
KEY form a sample: an image (`jpg`, `jpeg`, `png` or `webp`) and a caption, from `KEY.txt`,
else `KEY.json`'s "caption". Shards are read with `tarfile` in streaming mode (`r|*`): nothing
is extracted to disk and no seek is needed.

The training stream of process p of P reads shards p, p + P, ... (ValueError when it would get
none). Epoch e visits them in the order `default_rng([seed, e]).permutation`, samples flow
through a shuffle buffer of `data.shuffle_buffer` examples: once the buffer is full each new
sample replaces a uniformly drawn buffered one, which is emitted; at the epoch's end the buffer
is drained in random order, so every sample of the process's shards is emitted exactly once per
epoch. Batches then go through the file sources' train transform (`pipeline._TrainTransform`,
decode + `photo.PhotoTransform.train` + tokenizer), one generator per emitted sample seeded by
(seed, its serial number), so they equal the other sources' batches in keys, shapes and dtypes.

Position (`_ShardStream.get_state`, JSON): {epoch, shard (index in the epoch's shard order),
offset (complete samples consumed from that shard), serial (samples emitted so far),
epoch_good (usable samples met this epoch), rng (the buffer generator's bit_generator state),
buffer ([global shard index, sample number, KEY] of every buffered sample, in buffer order)}.
`set_state` re-reads the buffered samples from their shards (checking their keys) and resumes
reading the current shard after `offset` samples: the future stream is the same bit for bit.

Bad input is counted with the other sources' counters (`sanitize.ISSUE_KINDS`) and skipped
with a warning naming "<shard>:<KEY>": a sample without image member or with a json that does
not parse (skipped_malformed), a txt that is not UTF-8 (skipped_malformed), no caption
(skipped_empty_caption), an image that does not decode (skipped_undecodable); a shard cut off
mid-member (or unreadable as tar) counts one skipped_malformed and ends that shard; the rest of
the epoch continues. An epoch without any usable sample raises RuntimeError.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import pipeline, sanitize
from vlp_jax.data import sources
from vlp_jax.data.sources import SourceError
from vlp_jax.data.types import EvalSet

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_EVAL_SKIP_LOGS = 20
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ----------------------------------------------------------------------------- shard lists

def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: the first `{...}` group (recursively) becomes its
    alternatives: `{3..11}` the integers 3 ... 11 (zero padded to the longer bound's width when
    either bound has a leading zero, as bash), `{a,b}` the listed items; no braces: [pattern]."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        raise SourceError(f"{pattern}: unbalanced braces")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        alternatives = _split_top_level(body)
        if len(alternatives) < 2:           # bash keeps a brace group without ',' or '..'
            items = ["{" + body + "}"]
        else:
            items = [x for alt in alternatives for x in expand_braces(alt)]
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def expand_shards(spec: str) -> list[str]:
    """The shard files of `spec` (comma-separated brace patterns / paths), user home expanded,
    in order; SourceError naming the pattern when it is empty or a file is missing."""
    if not spec or not str(spec).strip():
        raise SourceError("data.name='webdataset' needs data.train_path (a shard pattern such "
                          "as /data/{00000..00099}.tar)")
    shards = [os.path.abspath(os.path.expanduser(p.strip()))
              for part in _split_top_level(str(spec)) if part.strip()
              for p in expand_braces(part.strip())]
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        raise SourceError(f"{spec}: matches no shard files" if len(missing) == len(shards) else
                          f"{spec}: {len(missing)} of {len(shards)} shards are missing, e.g. "
                          f"{missing[:3]}")
    return shards


def process_shards(shards: Sequence[str], process_index: int, process_count: int
                   ) -> list[int]:
    """Global indices of the shards process p of P reads: p, p + P, ...; ValueError when it
    would get none."""
    mine = list(range(process_index, len(shards), process_count))
    if not mine:
        raise ValueError(f"process {process_index} of {process_count} gets no webdataset shard "
                         f"(there are {len(shards)}); write at least {process_count} shards")
    return mine


# ----------------------------------------------------------------------------- reading

def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (KEY, extension): the extension starts at the first '.' of the base name
    (webdataset's convention: `a/b.seg.jpg` is KEY `a/b`, extension `seg.jpg`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def shard_samples(path: str, start: int = 0) -> Iterator[tuple[int, str, dict | None, str]]:
    """(sample number, KEY, {extension: bytes}, '') for the complete samples of a shard from
    number `start` on (members of earlier ones are skipped unread), in tar order; a shard
    that ends mid-member or is not a tar ends with one (number, KEY, None, reason)."""
    number, key, parts = 0, None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if key is not None:
                        if number >= start:
                            yield number, key, parts, ""
                        number += 1
                    key, parts = k, {}
                if number >= start:
                    parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if number >= start:
            yield number, key or "?", None, f"truncated or unreadable tar ({type(e).__name__}: {e})"
        return
    if key is not None and number >= start:
        yield number, key, parts, ""


def sample_record(shard: str, key: str, parts: dict | None, problem: str = "") -> dict:
    """A shard sample -> the pipeline's raw record {image: bytes, captions, label: -1, path:
    '<shard>:<KEY>'}, with {issue_kind, issue} when it cannot be used (see the module
    docstring)."""
    where = f"{shard}:{key}"
    record = {"image": b"", "captions": [], "label": -1, "path": where}

    def bad(kind: str, why: str) -> dict:
        return dict(record, issue_kind=kind, issue=f"{where}: {why}")

    if parts is None:
        return bad("skipped_malformed", problem)
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        return bad("skipped_malformed", f"no image member (has {sorted(parts)})")
    caption = None
    if "txt" in parts:
        try:
            caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return bad("skipped_malformed", "caption .txt is not UTF-8")
    if (caption is None or not caption.strip()) and "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return bad("skipped_malformed", f".json does not parse ({type(e).__name__})")
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
    if caption is None or not caption.strip():
        return bad("skipped_empty_caption", "empty caption (no .txt or json 'caption')")
    return dict(record, image=image, captions=[caption])


# ----------------------------------------------------------------------------- the stream

class _ShardStream:
    """This process's infinite stream of raw records (shuffled shards, shuffle buffer, bad
    records emitted where they are read); see the module docstring for the state."""

    def __init__(self, shards: Sequence[str], mine: Sequence[int], seed: int, buffer_size: int):
        if buffer_size < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {buffer_size}")
        self.shards, self.mine = list(shards), list(mine)
        self.seed, self.buffer_size = int(seed), int(buffer_size)
        self._start_epoch(0)
        self.serial = 0

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.pos, self.offset, self.epoch_good = epoch, 0, 0, 0
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.mine))
        self.order = [self.mine[i] for i in order]
        self.rng = np.random.default_rng([self.seed, epoch, 1])
        self.buffer: list[tuple[int, int, str, dict]] = []
        self._reader = None

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def _advance_shard(self) -> None:
        self._close_reader()
        self.pos, self.offset = self.pos + 1, 0

    def _emit(self, record: dict) -> dict:
        self.serial += 1
        return dict(record, index=self.serial - 1)

    def __next__(self) -> dict:
        while True:
            if self.pos < len(self.order):
                shard_id = self.order[self.pos]
                if self._reader is None:
                    self._reader = shard_samples(self.shards[shard_id], self.offset)
                item = next(self._reader, None)
                if item is None:
                    self._advance_shard()
                    continue
                number, key, parts, problem = item
                record = sample_record(self.shards[shard_id], key, parts, problem)
                if parts is None:
                    self._advance_shard()           # a truncated shard ends here
                else:
                    self.offset = number + 1
                if "issue_kind" in record:
                    return self._emit(record)
                self.epoch_good += 1
                entry = (shard_id, number, key, record)
                if len(self.buffer) < self.buffer_size:
                    self.buffer.append(entry)
                    continue
                j = int(self.rng.integers(len(self.buffer)))
                out, self.buffer[j] = self.buffer[j], entry
                return self._emit(out[3])
            if self.buffer:                          # the epoch's end: drain
                j = int(self.rng.integers(len(self.buffer)))
                out = self.buffer[j]
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
                return self._emit(out[3])
            if self.epoch_good == 0:
                raise RuntimeError(f"epoch {self.epoch} of shards "
                                   f"{[self.shards[i] for i in self.mine][:3]}... had no usable "
                                   "sample; is the data broken?")
            self._start_epoch(self.epoch + 1)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.pos, "offset": self.offset,
                "serial": self.serial, "epoch_good": self.epoch_good,
                "rng": self.rng.bit_generator.state,
                "buffer": [[s, n, k] for s, n, k, _ in self.buffer]}

    def set_state(self, state: dict) -> None:
        self._close_reader()
        self._start_epoch(int(state["epoch"]))
        self.pos, self.offset = int(state["shard"]), int(state["offset"])
        self.serial, self.epoch_good = int(state["serial"]), int(state["epoch_good"])
        self.rng.bit_generator.state = state["rng"]
        self.buffer = self._reread(state["buffer"])

    def _reread(self, wanted: Sequence[Sequence]) -> list[tuple[int, int, str, dict]]:
        """The buffered samples [shard, number, KEY] read again from their shards."""
        by_shard: dict[int, dict[int, str]] = {}
        for s, n, k in wanted:
            by_shard.setdefault(int(s), {})[int(n)] = str(k)
        found: dict[tuple[int, int], dict] = {}
        for s, numbers in by_shard.items():
            last = max(numbers)
            for number, key, parts, _ in shard_samples(self.shards[s]):
                if number in numbers:
                    if key != numbers[number] or parts is None:
                        raise ValueError(f"{self.shards[s]}: sample {number} is {key!r}, the "
                                         f"saved state expects {numbers[number]!r}; the shards "
                                         "changed since the checkpoint")
                    found[s, number] = sample_record(self.shards[s], key, parts)
                if number >= last:
                    break
            if len([n for n in numbers if (s, n) in found]) < len(numbers):
                raise ValueError(f"{self.shards[s]}: fewer samples than the saved state "
                                 "expects; the shards changed since the checkpoint")
        return [(int(s), int(n), str(k), found[int(s), int(n)]) for s, n, k in wanted]


class _Batches:
    """Batches of `batch` examples from a `_ShardStream`: each record goes through
    `transform(record, default_rng([map_seed, record serial]))`; skipped records' issue
    counts ride on the next kept example (as `pipeline._SkipAndCarry`), so nothing is pending
    between batches and the stream position is the whole state."""

    def __init__(self, stream: _ShardStream, transform, batch: int, map_seed: int,
                 threads: int):
        self.stream, self.transform, self.batch = stream, transform, batch
        self.map_seed = map_seed
        self._pool = ThreadPoolExecutor(threads) if threads > 0 else None

    def __iter__(self) -> "_Batches":
        return self

    def _apply(self, record: dict) -> dict:
        return self.transform(record, np.random.default_rng([self.map_seed, record["index"]]))

    def __next__(self) -> dict:
        kept = []
        pending = np.zeros(sanitize.NUM_ISSUES, np.int32)
        while len(kept) < self.batch:
            records = [next(self.stream) for _ in range(self.batch - len(kept))]
            mapped = (self._pool.map(self._apply, records) if self._pool is not None
                      else map(self._apply, records))
            for example in mapped:
                if example.get(pipeline.SKIP_KEY, False):
                    pending = pending + example["data_issues"]
                    continue
                example["data_issues"] = example["data_issues"] + pending
                pending = np.zeros_like(pending)
                kept.append(example)
        return {k: np.stack([e[k] for e in kept]) for k in kept[0]}

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)


def make_train_iterator(data_config, *, global_batch_size: int, seed: int, shards: Sequence[str],
                        tokenizer, photos, process_index: int = 0,
                        process_count: int = 1) -> pipeline.TrainIterator:
    """This process's training batches from webdataset `shards` (see the module docstring), as
    a `pipeline.TrainIterator`: image float32 [B, S, S, 3], text int32 [B, L], label int32 [B]
    (-1), B = global_batch_size // process_count; `get_state` / `set_state` resume exactly."""
    local_batch = pipeline._validate_batch(global_batch_size, process_index, process_count)
    c = resolve_part("data", data_config)
    mine = process_shards(shards, process_index, process_count)
    stream_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    stream = _ShardStream(shards, mine, stream_seed, int(c.shuffle_buffer))
    transform = pipeline._TrainTransform(c, tokenizer, None, photos)
    batches = _Batches(stream, transform, local_batch, map_seed,
                       pipeline.read_threads(c, photos=True))
    meta = dict(seed=int(seed), local_batch=local_batch, process_index=process_index,
                process_count=process_count, dataset=f"webdataset[{len(shards)} shards]",
                shuffle_buffer=int(c.shuffle_buffer))
    return pipeline.TrainIterator(batches, meta)


# ----------------------------------------------------------------------------- tokenizer, eval

def caption_sample(shards: Sequence[str], limit: int) -> list[str]:
    """The first `limit` usable captions of `shards`, in shard and tar order (the tokenizer's
    training text)."""
    out: list[str] = []
    for shard in shards:
        for _, key, parts, problem in shard_samples(shard):
            record = sample_record(shard, key, parts, problem)
            if "issue_kind" not in record:
                out.extend(c for c in record["captions"] if c.strip())
            if len(out) >= limit:
                return out[:limit]
    return out


def cached_caption_sample(shards: Sequence[str], limit: int, cache_dir: str) -> list[str]:
    """`caption_sample(shards, limit)`, cached as <cache_dir>/wds_captions_<sha256 of limit
    and every shard's path, size and mtime>.json, so a restart does not read the shards again
    (a rewritten shard changes the key)."""
    digest = hashlib.sha256(f"{int(limit)}\n".encode())
    for shard in shards:
        st = os.stat(shard)
        digest.update(f"{shard}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    path = os.path.join(cache_dir, f"wds_captions_{digest.hexdigest()[:20]}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    captions = caption_sample(shards, limit)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(captions, f)
    os.replace(tmp, path)
    return captions


def load_eval_set(shards: Sequence[str], transform, prompt_templates: Sequence[str],
                  max_examples: int | None = None) -> EvalSet:
    """The first `max_examples` usable samples (default all) of `shards` in order, decoded and
    preprocessed by `transform.eval` (a `photo.PhotoTransform`): images float32 [N, S, S, 3],
    one caption each, labels -1 (`sources.eval_set_from_records`)."""
    def records():
        for shard in shards:
            for _, key, parts, problem in shard_samples(shard):
                record = sample_record(shard, key, parts, problem)
                yield record, record["path"], -1
    return sources.eval_set_from_records(records(), transform, prompt_templates, max_examples,
                                         f"{shards[0]} ..." if shards else "webdataset")
