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
B = global_batch_size // process_count. The stream is infinite (each epoch reshuffled),
deterministic given the seed, reads only this process's shard (records
process_index::process_count of the train split), and resumable: `get_state()` is JSON-able and
`set_state()` makes the iterator yield exactly what it would have yielded.

Data config fields (`default_data_config()`; other modules read these names):
  name                'shapes' (the only dataset)
  data_dir            TFDS data dir; None -> $VLP_JAX_DATA_DIR or ~/.cache/vlp_jax/tensorflow_datasets
  image_size          image side in pixels (64)
  num_train, num_validation, num_test   split sizes (20000, 1000, 1000)
  captions_per_image  captions stored per image (5)
  seed                dataset seed (0); the iterator's shuffle seed is make_train_iterator's
  vocab_size          sentencepiece vocabulary upper bound (256)
  text_length         L, token ids per caption incl. bos/eos (28: the longest caption has 27)
  augment             crop-and-resize + brightness/contrast jitter (True); optional fine
                      control: augment_min_scale, augment_max_scale, augment_max_shift,
                      augment_brightness, augment_contrast (see preprocess.AugmentConfig)
  two_views           add `image2` (False)
  all_captions        add `captions` [B, K, L] (False)
  num_caption_candidates  K; 0 -> captions_per_image (doubled when rewrites are given)
  rewrites_path       JSON-lines caption rewrites for `captions` (None; see data.rewrites)
  worker_count        grain worker processes (0: read in this process)
  read_threads        threads reading ahead in this process (2)
  prefetch_batches    batches read ahead (2)
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np

from vlp_jax.data import preprocess, rewrites, shapes_builder, shapes_world
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.data.types import EvalSet

SPLITS = ("train", "validation", "test")
_STATE_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
    """The main job's data config (fields documented in the module docstring)."""
    return ml_collections.ConfigDict(dict(
        name="shapes", data_dir=None, image_size=64, num_train=20000, num_validation=1000,
        num_test=1000, captions_per_image=5, seed=0, vocab_size=256, text_length=28,
        augment=True, two_views=False, all_captions=False, num_caption_candidates=0,
        rewrites_path=None, worker_count=0, read_threads=2, prefetch_batches=2))


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
    """(index, example) -> example with its train-split record index."""

    def __call__(self, index: int, example: dict) -> dict:
        return dict(example, index=index)


class _TrainTransform:
    """One decoded example -> the batch contract's per-example arrays (random per step)."""

    def __init__(self, data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 table: rewrites.RewriteTable | None):
        self.tokenizer, self.table = tokenizer, table
        self.length = int(data_config.text_length)
        self.augment = bool(data_config.augment)
        self.augment_cfg = preprocess.augment_config(data_config)
        self.two_views = bool(data_config.get("two_views", False))
        self.all_captions = bool(data_config.get("all_captions", False))
        self.num_candidates = num_caption_candidates(data_config)

    def _view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.augment:
            return preprocess.augment_image(image, rng, self.augment_cfg)
        return preprocess.normalize(image)

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = [_as_str(c) for c in example["captions"]]
        pick = captions[int(rng.integers(len(captions)))]
        out = {"image": self._view(example["image"], rng),
               "text": self.tokenizer.encode([pick], self.length)[0],
               "label": np.int32(example["label"])}
        if self.two_views:
            out["image2"] = self._view(example["image"], rng)
        if self.all_captions:
            texts = captions
            if self.table is not None:
                texts = self.table.candidates(captions, int(example["index"]))
            out["captions"] = rewrites.candidate_tokens(
                texts, lambda t: self.tokenizer.encode(t, self.length), self.num_candidates,
                self.length)
        return out


def num_caption_candidates(data_config: ml_collections.ConfigDict) -> int:
    """K of the `captions` key."""
    k = int(data_config.get("num_caption_candidates", 0) or 0)
    if k:
        return k
    doubled = 2 if data_config.get("rewrites_path") else 1
    return int(data_config.captions_per_image) * doubled


# ----------------------------------------------------------------------------- training

class TrainIterator:
    """Infinite iterator of host-local batches with JSON-able `get_state` / `set_state`."""

    def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any]):
        self._dataset, self._meta = dataset, meta
        self._it = iter(dataset)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """{'version', 'meta' (what the position refers to), 'grain' (the position)}."""
        return {"version": _STATE_VERSION, "meta": dict(self._meta),
                "grain": _jsonable(self._it.get_state())}

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
                        seed: int, process_index: int = 0, process_count: int = 1
                        ) -> TrainIterator:
    """The training stream of this process (see the module docstring)."""
    local_batch = _validate_batch(global_batch_size, process_index, process_count)
    if int(data_config.text_length) < 2:
        raise ValueError(f"data.text_length must be >= 2, got {data_config.text_length}")
    builder = shapes_builder.ensure_built(data_config)
    tokenizer = shapes_builder.load_tokenizer(data_config)
    table = None
    if data_config.get("all_captions", False) and data_config.get("rewrites_path"):
        table = rewrites.load_rewrites(data_config.rewrites_path)
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    ds = grain.MapDataset.source(builder.as_data_source("train")).map_with_index(_AddIndex())
    ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(_TrainTransform(data_config, tokenizer, table), seed=map_seed)
    ds = ds.batch(local_batch, drop_remainder=True)
    options = grain.ReadOptions(num_threads=int(data_config.get("read_threads", 2)),
                                prefetch_buffer_size=int(data_config.get("prefetch_batches", 2)))
    it_ds = ds.to_iter_dataset(options)
    workers = int(data_config.get("worker_count", 0))
    if workers > 0:
        _mark_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    meta = dict(seed=int(seed), local_batch=local_batch, process_index=process_index,
                process_count=process_count, dataset=builder.builder_config.name)
    return TrainIterator(it_ds, meta)


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
        scenes=[json.loads(_as_str(e["scene"])) for e in examples])


def iterate_split(data_config: ml_collections.ConfigDict, split: str) -> Iterator[dict]:
    """Raw decoded examples of a split in stored order (image uint8, captions str, scene dict)."""
    source = shapes_builder.ensure_built(data_config).as_data_source(split)
    for i in range(len(source)):
        e = source[i]
        yield {"image": e["image"], "captions": [_as_str(c) for c in e["captions"]],
               "label": int(e["label"]), "scene": json.loads(_as_str(e["scene"]))}
