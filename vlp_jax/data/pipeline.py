"""The grain input pipeline over the shapes TFDS data (array_record; no TensorFlow at read time).

Training batches follow `vlp_jax.data.types`: host-local numpy dicts with
    image  float32 [B, H, W, 3] in [-1, 1]   (augmented when data.augment)
    text   int32   [B, L]  one of the image's captions, drawn per example and step
    label  int32   [B]     class id of the main object
and, on request,
    image2   float32 [B, H, W, 3]  a second, independent augmentation  (data.two_views)
    captions int32   [B, K, L]     all caption candidates of the image    (data.all_captions)
                                   (its captions, then rewrites from data.rewrites_path; rows
                                   beyond an example's candidates are all pad)
    the fields of data.text_tasks (VL-T5 prompts, VQA questions and soft scores, SNLI-VE
    hypotheses, NLVR2 image pairs and statements): `vlp_jax.data.task_fields`
B = global_batch_size // process_count. Records are cleaned first (`vlp_jax.data.sanitize`):
greyscale / RGBA images converted to RGB, images of another size cropped and resized,
empty captions dropped, over-long captions truncated (bos ... eos kept); records with an
undecodable image, no usable caption or missing fields are skipped. Every issue is counted:
`TrainIterator.issue_totals()` ({kind: count}, part of the iterator state), which the trainer
logs as `data/<kind>`. The stream is infinite (each epoch reshuffled),
deterministic given the seed, reads only this process's shard (records
process_index::process_count of the train split), and resumable: `get_state()` is JSON-able and
`set_state()` makes the iterator yield exactly what it would have yielded.

Data config fields: declared, with their types, defaults and meanings, in
`vlp_jax/data/fields.py` (`default_data_config()` returns the defaults: the main job's 64 px,
20k-image world). The functions here accept an unresolved section and fill it in
(`config_schema.resolve_part`).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import (memo, preprocess, rewrites, sanitize, shapes_builder, shapes_world,
                          task_fields)
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.data.types import EvalSet

SPLITS = ("train", "validation", "test")
_STATE_VERSION = 2   # 2: skip-and-carry stage, issue totals


def default_data_config() -> ml_collections.ConfigDict:
    """The declared defaults of the data section (vlp_jax/data/fields.py): the main job's data.
    Fields that default to None are typed placeholders, so `--config.data.data_dir=...` can
    set them."""
    return resolve_part("data", None)


def tiny_data_config(**overrides) -> ml_collections.ConfigDict:
    """A test-sized config (24 px, 512/128/128 examples) with `overrides` applied; unknown
    field names raise."""
    config = default_data_config()
    config.update(dict(image_size=24, num_train=512, num_validation=128, num_test=128))
    unknown = sorted(set(overrides) - set(config.keys()))
    if unknown:
        raise ValueError(f"unknown data config fields {unknown}; valid: {sorted(config.keys())}")
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- transforms

def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _AddIndex:
    """(index, example) -> example with its train-split record index. grain hands repeated
    epochs' records their position in the repeated stream, hence the modulo."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, index: int, example: dict) -> dict:
        return dict(example, index=index % self.num_records)


class _DictRecords:
    """Wraps a random-access source so every item is a dict: grain drops None items silently
    (its filter marker), so a record that is not a dict becomes {'not_a_dict': type name},
    which _TrainTransform skips and counts as malformed."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        return record if isinstance(record, dict) else {"not_a_dict": type(record).__name__}


class _TrainTransform:
    """One raw record -> the batch contract's per-example arrays (random per step), plus
    `data_issues` int32 [NUM_ISSUES] (`sanitize.ISSUE_KINDS`); a record that cannot be used
    becomes a skip marker {SKIP_KEY: True, 'data_issues': [...]} instead (see `_SkipAndCarry`).
    """

    def __init__(self, data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 table: rewrites.RewriteTable | None, photos=None, pair_source=None):
        self.tokenizer, self.table, self.photos = tokenizer, table, photos
        self.size = int(data_config.image_size)
        self.length = int(data_config.text_length)
        self.augment = bool(data_config.augment)
        self.augment_cfg = preprocess.augment_config(data_config)
        self.two_views = bool(data_config.two_views)
        self.all_captions = bool(data_config.all_captions)
        self.num_candidates = task_fields.num_caption_candidates(data_config)
        self.task = data_config.text_tasks
        self.vlt5 = self.task == "vlt5"
        self.pair_source = pair_source
        if self.task in task_fields.PAIR_TASKS and pair_source is None:
            raise ValueError(f"data.text_tasks={self.task!r} needs the train records to pair")

    def _view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._view_and_draw(image, rng)[0]

    def _view_and_draw(self, image: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, preprocess.AugmentDraw | None]:
        """(the training view, the augmentation it applied: identity without augmentation,
        None for photos, whose transform keeps its own draw)."""
        if self.photos is not None:
            return self.photos.train(image, rng), None
        if self.augment:
            draw = preprocess.draw_augment(rng, self.augment_cfg)
            return preprocess.apply_augment(image, draw), draw
        return preprocess.normalize(image), preprocess.AugmentDraw()

    def _clean(self, example) -> tuple[np.ndarray, list[str], int, list[str]]:
        """(uint8 [S, S, 3] image, captions, label, issue kinds) or BadExample. A record may
        carry its source's verdict (`issue_kind`, `issue`: see `vlp_jax.data.sources`); with
        `photos` (a `photo.PhotoTransform`), images keep their own size until `_view`."""
        if isinstance(example, dict) and "issue_kind" in example:
            raise sanitize.BadExample(str(example.get("issue", "")), example["issue_kind"])
        try:
            raw_image, raw_captions, raw_label = (example["image"], example["captions"],
                                                  example["label"])
            label = int(np.asarray(raw_label).reshape(()))
        except (KeyError, TypeError, ValueError) as e:
            raise sanitize.BadExample(f"malformed record: {type(e).__name__}: {e}",
                                      "skipped_malformed") from None
        try:
            if self.photos is not None:
                image, flags = self.photos.clean(raw_image)
            else:
                image, flags = sanitize.to_rgb_image(raw_image, self.size)
            captions, dropped = sanitize.clean_captions(raw_captions)
        except sanitize.BadExample as e:
            path = example.get("path") if isinstance(example, dict) else None
            if path:
                raise sanitize.BadExample(f"{path}: {e}", e.kind) from None
            raise
        kinds = [{"converted": "converted_channels", "resized": "resized"}[f] for f in flags]
        if dropped:
            kinds.append("dropped_empty_caption")
        return image, captions, label, kinds

    def _task_fields(self, example: dict, rng: np.random.Generator, emitted: list[str],
                     left: np.ndarray, draw: preprocess.AugmentDraw | None) -> dict:
        """The fields data.text_tasks adds (`task_fields`), from the record's scene; 'nlvr2'
        reads its right image from another record (`task_fields.draw_partner`), which is
        cleaned like any record (a bad partner skips the example, counted by its kind); `left`
        is this example's view, the first of 'nlvr2''s `images`, made by `draw` (boxes follow
        it)."""
        scene, partner = task_fields.record_scene(example, self.task), None
        if self.task in task_fields.PAIR_TASKS:
            other = self.pair_source[task_fields.draw_partner(
                int(example["index"]), len(self.pair_source), rng)]
            right, _, _, _ = self._clean(other)
            partner = task_fields.record_scene(other, self.task)
        fields, texts = task_fields.make_task_fields(
            self.task, scene, rng, self.tokenizer.encode, self.length, partner_scene=partner,
            map_boxes=None if draw is None else draw.map_boxes)
        emitted += texts
        if partner is not None:
            fields["images"] = np.stack([left, self._view(right, rng)])
        return fields

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        try:
            image, captions, label, kinds = self._clean(example)
        except sanitize.BadExample as e:
            _log_skip(example, e)
            return {SKIP_KEY: True, "data_issues": sanitize.issue_vector([e.kind])}
        # Drawn in every mode, so the rest of the example's random stream is the same
        # whichever text the batch carries; with VL-T5 tasks the task's target replaces it
        # (neither encoded nor counted as truncated).
        pick = captions[int(rng.integers(len(captions)))]
        emitted = [] if self.vlt5 else [pick]
        view, draw = self._view_and_draw(image, rng)
        out = {"image": view, "label": np.int32(label)}
        if not self.vlt5:
            out["text"] = self.tokenizer.encode([pick], self.length)[0]
        if self.task != "captions":
            try:
                out.update(self._task_fields(example, rng, emitted, view, draw))
            except sanitize.BadExample as e:
                _log_skip(example, sanitize.BadExample(f"its {self.task} partner: {e}", e.kind))
                return {SKIP_KEY: True, "data_issues": sanitize.issue_vector([e.kind])}
        if self.two_views:
            out["image2"] = self._view(image, rng)
        if self.all_captions:
            texts = captions
            if self.table is not None:
                texts = self.table.candidates(captions, int(example["index"]))
            texts = list(texts)[:self.num_candidates]
            emitted += texts
            out["captions"] = rewrites.candidate_tokens(
                texts, lambda t: self.tokenizer.encode(t, self.length), self.num_candidates,
                self.length)
        if sanitize.any_overflows(self.tokenizer, emitted, self.length):
            kinds.append("truncated_caption")
        out["data_issues"] = sanitize.issue_vector(kinds)
        return out


SKIP_KEY = "_skip"
_MAX_SKIP_LOGS = 20
_skip_logs = [0]


def _log_skip(example, error: sanitize.BadExample) -> None:
    """Logs the first _MAX_SKIP_LOGS skipped records of this process (all are counted)."""
    if _skip_logs[0] >= _MAX_SKIP_LOGS:
        return
    _skip_logs[0] += 1
    index = example.get("index", "?") if isinstance(example, dict) else "?"
    more = " (further skips are only counted)" if _skip_logs[0] == _MAX_SKIP_LOGS else ""
    logging.warning("skipping train record %s: %s%s", index, error, more)


class _SkipAndCarry(grain.IterDataset):
    """Drops skip markers; their `data_issues` are added to the next kept example's, so the
    counts of every consumed record reach the batches. A skip is only read while looking for
    the next kept example, so between two `next` calls nothing is pending and the position
    is the parent's: resuming stays exact. Raises RuntimeError after `max_skips` consecutive
    skips (a whole shard of unusable records would otherwise loop forever)."""

    def __init__(self, parent: grain.IterDataset, max_skips: int):
        super().__init__(parent)
        self._max_skips = max(1, int(max_skips))

    def __iter__(self) -> "_SkipAndCarryIterator":
        return _SkipAndCarryIterator(self._parent.__iter__(), self._max_skips)

    def __str__(self) -> str:
        return "SkipAndCarry"


class _SkipAndCarryIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_skips: int):
        super().__init__(parent)
        self._max_skips = max_skips

    def __next__(self) -> dict:
        pending = np.zeros(sanitize.NUM_ISSUES, np.int32)
        for _ in range(self._max_skips):
            element = next(self._parent)
            if not element.get(SKIP_KEY, False):
                element["data_issues"] = element["data_issues"] + pending
                return element
            pending += element["data_issues"]
        raise RuntimeError(
            f"{self._max_skips} consecutive training records were unusable (a whole shard): "
            f"{sanitize.issue_dict(pending)}; is the data broken?")

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "SkipAndCarryIterator"


# ----------------------------------------------------------------------------- training

class TrainIterator:
    """Infinite iterator of host-local batches with JSON-able `get_state` / `set_state`.

    Batches follow the contract (image, text, label, ...); the per-example `data_issues`
    counters are taken out of each batch and summed here: `issue_totals()` gives the counts
    of every record consumed so far (skipped ones included), and they are part of the state,
    so a resumed run keeps counting from where it stopped.
    """

    def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any]):
        self._dataset, self._meta = dataset, meta
        self._it = iter(dataset)
        self._totals = np.zeros(sanitize.NUM_ISSUES, np.int64)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        issues = batch.pop("data_issues")                     # int32 [B, NUM_ISSUES]
        self._totals += np.asarray(issues, np.int64).sum(axis=0)
        return batch

    def issue_totals(self) -> dict[str, int]:
        """{kind: count} over all records consumed so far (sanitize.ISSUE_KINDS)."""
        return sanitize.issue_dict(self._totals)

    def get_state(self) -> dict[str, Any]:
        """{'version', 'meta' (what the position refers to), 'grain' (the position),
        'issues' (issue_totals())}."""
        return {"version": _STATE_VERSION, "meta": dict(self._meta),
                "grain": _jsonable(self._it.get_state()), "issues": self.issue_totals()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position from get_state(); ValueError if it belongs to another stream."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a TrainIterator state (version {_STATE_VERSION}): {state!r}")
        theirs = state.get("meta", {})
        diff = {k: (theirs.get(k), v) for k, v in self._meta.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"iterator state is for another data stream; (saved, current) "
                             f"differ in {diff}")
        self._it.set_state(state["grain"])
        issues = state.get("issues", {})
        self._totals = np.asarray([int(issues.get(k, 0)) for k in sanitize.ISSUE_KINDS],
                                  np.int64)


def _jsonable(state):
    """grain states are dicts of ints/strings; check, and fail loudly if that ever changes."""
    json.dumps(state)
    return state


def _validate_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count="
                         f"{process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    return global_batch_size // process_count


def make_train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        source=None, tokenizer: Tokenizer | None = None,
                        photos=None) -> TrainIterator:
    """The training stream of this process (see the module docstring).

    `source`: the raw train records, any random-access object (`__len__`, `__getitem__`)
    whose items are dicts with `image` (encoded bytes or a uint8 array [H, W(, C)]),
    `captions` (a list of str / bytes) and `label` (int); default the shapes train split.
    Bad records are handled as `vlp_jax.data.sanitize` describes (skipped, converted,
    truncated) and counted (`TrainIterator.issue_totals`). `tokenizer`: default the shapes
    dataset's. `photos`: a `vlp_jax.data.photo.PhotoTransform` for sources of photos of any
    size (decoded at their size, then its train transform instead of the shapes
    augmentation). With both `source` and `tokenizer` given, the shapes dataset is not built.
    """
    local_batch = _validate_batch(global_batch_size, process_index, process_count)
    data_config = resolve_part("data", data_config)
    if int(data_config.text_length) < 2:
        raise ValueError(f"data.text_length must be >= 2, got {data_config.text_length}")
    if source is None or tokenizer is None:
        builder = shapes_builder.ensure_built(data_config)
        tokenizer = tokenizer or shapes_builder.load_tokenizer(data_config)
    table = None
    if data_config.all_captions and data_config.rewrites_path:
        table = rewrites.load_rewrites(data_config.rewrites_path)
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    if source is None:
        source, name = builder.as_data_source("train"), builder.builder_config.name
    else:
        name = str(getattr(source, "name", type(source).__name__))
        source = _DictRecords(source)
    source = memo.MemoisedSource(source, cache_bytes(data_config))
    ds = grain.MapDataset.source(source).map_with_index(_AddIndex(len(source)))
    ds = ds[process_index::process_count]
    shard_len = len(ds)
    if shard_len < 1:
        raise ValueError(f"process {process_index} of {process_count} has no train records "
                         f"(the source has {len(source)})")
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(_TrainTransform(data_config, tokenizer, table, photos, pair_source=source),
                       seed=map_seed)
    prefetch = int(data_config.prefetch_batches) * local_batch
    options = grain.ReadOptions(num_threads=read_threads(data_config, photos is not None),
                                prefetch_buffer_size=prefetch)
    it_ds = _SkipAndCarry(ds.to_iter_dataset(options), max_skips=shard_len)
    it_ds = it_ds.batch(local_batch, drop_remainder=True)
    workers = int(data_config.worker_count)
    if workers > 0:
        _mark_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    meta = dict(seed=int(seed), local_batch=local_batch, process_index=process_index,
                process_count=process_count, dataset=name)
    return TrainIterator(it_ds, meta)


DEFAULT_CACHE_MB = 512


def cache_bytes(data_config: ml_collections.ConfigDict) -> int:
    """data.cache_mb in bytes (None: DEFAULT_CACHE_MB)."""
    mb = data_config.cache_mb
    if mb is None:
        mb = DEFAULT_CACHE_MB
    if int(mb) < 0:
        raise ValueError(f"data.cache_mb must be >= 0, got {mb}")
    return int(mb) << 20


def read_threads(data_config: ml_collections.ConfigDict, photos: bool) -> int:
    """data.read_threads, or its default: 2 when the pipeline decodes photos (PIL releases the
    GIL), else 0 (records read on demand, while the device runs the step before: the shapes
    transforms hold the GIL, and threads measured 2x slower per example at 24 and 64 px)."""
    if data_config.read_threads is None:
        return 2 if photos else 0
    if int(data_config.read_threads) < 0:
        raise ValueError(f"data.read_threads must be >= 0, got {data_config.read_threads}")
    return int(data_config.read_threads)


def _mark_flags_parsed() -> None:
    """grain workers read absl flags; outside absl.app.run they are not parsed yet."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- evaluation

def load_eval_set(data_config: ml_collections.ConfigDict, split: str,
                  max_examples: int | None = None) -> EvalSet:
    """The first `max_examples` (default all) examples of a split, images normalised without
    augmentation, with class names, prompt templates and scene dicts."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; valid: {SPLITS}")
    source = shapes_builder.ensure_built(data_config).as_data_source(split)
    n = len(source) if max_examples is None else min(int(max_examples), len(source))
    if n < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    examples = [source[i] for i in range(n)]
    return EvalSet(
        images=preprocess.normalize(np.stack([e["image"] for e in examples])),
        captions=[[_as_str(c) for c in e["captions"]] for e in examples],
        labels=np.asarray([e["label"] for e in examples], np.int32),
        class_names=list(shapes_world.CLASS_NAMES),
        prompt_templates=list(shapes_world.PROMPT_TEMPLATES),
        scenes=[task_fields.decode_scene(e["scene"]) for e in examples])


def iterate_split(data_config: ml_collections.ConfigDict, split: str) -> Iterator[dict]:
    """Raw decoded examples of a split in stored order (image uint8, captions str, scene dict)."""
    source = shapes_builder.ensure_built(data_config).as_data_source(split)
    for i in range(len(source)):
        e = source[i]
        yield {"image": e["image"], "captions": [_as_str(c) for c in e["captions"]],
               "label": int(e["label"]), "scene": task_fields.decode_scene(e["scene"])}
